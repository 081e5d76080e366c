"""Prefix reuse in position-resolved patching sweeps, by prompt length (mechscope only).

    .venv/bin/python benchmarks/patching_prefix.py [--reps 1 3] [--repeats 2]

A patch at position p leaves positions < p as in the patched run, so `activation_patch`
(``reuse_prefix=True``, the default) runs only positions p onward and reads the earlier keys
and values from that run. This times the ``resid_pre`` layer x position sweep (layers
0, 3, ..., 27; 2 IOI prompts, the prompt repeated ``reps`` times to lengthen it; logits at the
final position only) with and without the reuse, alternating the two so that warm-up and load
drift affect both, and checks that the results agree.
"""

from __future__ import annotations

import argparse
import time

import torch

import mechscope as ms
from mechscope.patching import activation_patch

PROMPT = "Then, Kevin and Andrew went to the store. Andrew gave a kiss to"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, nargs="+", default=[1, 3], help="prompt repetitions (lengths)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (the minimum is kept)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = ms.load("smollm2-135m", device="cpu")
    answer, other = model.to_single_token(" Kevin"), model.to_single_token(" Andrew")
    metric = lambda logits: logits[:, -1, answer] - logits[:, -1, other]  # noqa: E731
    for reps in args.reps:
        clean = model.to_tokens([" ".join([PROMPT] * reps)] * 2)
        corrupted = model.to_tokens([" ".join([PROMPT.replace("Andrew gave", "Kevin gave")] * reps)] * 2)
        times: dict[bool, list[float]] = {False: [], True: []}
        results = {}
        for _ in range(args.repeats):
            for reuse in (False, True):
                start = time.perf_counter()
                results[reuse] = activation_patch(model, clean, corrupted, metric, "resid_pre", layers=range(0, 30, 3),
                                                  reuse_prefix=reuse, logit_positions=-1)  # fmt: skip
                times[reuse].append(time.perf_counter() - start)
        full, reused = min(times[False]), min(times[True])
        diff = float((results[True] - results[False]).abs().max())
        print(f"{clean.shape[1]:>4} tokens: every position {full:6.2f}s, reusing the prefix {reused:6.2f}s "
              f"({full / reused:.2f}x), max diff {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()

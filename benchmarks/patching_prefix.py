"""Prefix reuse in position-resolved patching sweeps, by prompt length (mechscope only).

    .venv/bin/python benchmarks/patching_prefix.py [--reps 1 3] [--repeats 3]

A patch at position p leaves positions < p as in the patched run, so `activation_patch`
(``reuse_prefix=True``, the default) runs only positions p onward and reads the earlier keys
and values from that run. This times the ``resid_pre`` layer x position sweep (layers
0, 3, ..., 27; 2 IOI prompts, the prompt repeated ``reps`` times to lengthen it; logits at the
final position only) with and without the reuse, interleaved round by round
(``common.interleave``: rotated order, samples taken while other processes used more than the
gate retaken; median and spread reported), and checks that the results agree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mechscope as ms  # noqa: E402
from mechscope.patching import activation_patch  # noqa: E402

PROMPT = "Then, Kevin and Andrew went to the store. Andrew gave a kiss to"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, nargs="+", default=[1, 3], help="prompt repetitions (lengths)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3 under the rules)")
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = ms.load("smollm2-135m", device="cpu")
    answer, other = model.to_single_token(" Kevin"), model.to_single_token(" Andrew")
    metric = lambda logits: logits[:, -1, answer] - logits[:, -1, other]  # noqa: E731
    for reps in args.reps:
        clean = model.to_tokens([" ".join([PROMPT] * reps)] * 2)
        corrupted = model.to_tokens([" ".join([PROMPT.replace("Andrew gave", "Kevin gave")] * reps)] * 2)
        results = {}

        def sweep(reuse: bool, clean=clean, corrupted=corrupted, results=results) -> None:
            results[reuse] = activation_patch(model, clean, corrupted, metric, "resid_pre", layers=range(0, 30, 3),
                                              reuse_prefix=reuse, logit_positions=-1)  # fmt: skip

        timed = common.interleave(
            {"every position": lambda: sweep(False), "reusing the prefix": lambda: sweep(True)},
            reps=args.repeats,
            max_other=args.gate,
        )
        full, reused = timed["every position"], timed["reusing the prefix"]
        diff = float((results[True] - results[False]).abs().max())
        print(f"{clean.shape[1]:>4} tokens: every position {full['median_s']:6.2f}s (spread {full['spread']:.2f}), "
              f"reusing the prefix {reused['median_s']:6.2f}s (spread {reused['spread']:.2f}) "
              f"({full['median_s'] / reused['median_s']:.2f}x), max diff {diff:.1e}", flush=True)  # fmt: skip
        print(f"      {common.gate_note(timed, args.gate)}", flush=True)


if __name__ == "__main__":
    main()

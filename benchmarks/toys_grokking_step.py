"""Grokking training step: `final_logits` (last block's MLP and unembedding on the `=` position only)
against the plain forward `model(tokens)[:, -1]`, same model, data and optimiser, measured in one run.

    .venv/bin/python benchmarks/toys_grokking_step.py [--p 113] [--steps 5] [--rounds 5] [--threads 1]

A sample is ``--steps`` training steps (forward, loss, backward, AdamW step) through one path; the
two paths are interleaved round by round (``common.interleave``: rotated order, samples taken
while other processes used more than the gate retaken), after two warm-up steps each. Both paths
train the same model, so the weights move on between samples exactly as in a real run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from mechscope.model.transformer import HookedTransformer  # noqa: E402
from mechscope.toys import fourier  # noqa: E402
from mechscope.toys.modular import GrokkingConfig, final_logits, modular_addition_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--steps", type=int, default=5, help="training steps per timed sample")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 3 under the rules)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GrokkingConfig(p=args.p)
    data = modular_addition_data(cfg.p, cfg.frac_train, cfg.data_seed)
    x, y = data.tokens[data.train_idx], data.labels[data.train_idx]
    model = HookedTransformer(cfg.model_config()).init_weights(seed=0, std=cfg.d_model**-0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    paths = {"final_logits": lambda: final_logits(model, x), "model(tokens)[:, -1]": lambda: model(x)[:, -1]}

    def train(forward, steps: int) -> None:
        for _ in range(steps):
            fourier.modular_loss(forward()[:, : cfg.p], y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for forward in paths.values():
        train(forward, 2)  # warm-up
    timed = common.interleave(
        {name: (lambda forward=forward: train(forward, args.steps)) for name, forward in paths.items()},
        reps=args.rounds,
        max_other=args.gate,
    )
    print(f"p={cfg.p}, {len(y)} training pairs, {args.threads} thread(s), {args.rounds} interleaved rounds "
          f"of {args.steps} steps per path")  # fmt: skip
    print("| path | ms / step (median) | spread |")
    print("|---|---|---|")
    for name, r in timed.items():
        print(f"| `{name}` | {r['median_s'] / args.steps * 1000:.1f} | {r['spread']:.2f} |")
    ratio = timed["model(tokens)[:, -1]"]["median_s"] / timed["final_logits"]["median_s"]
    print(f"speed-up of final_logits: {ratio:.2f}x")
    print(common.gate_note(timed, args.gate))


if __name__ == "__main__":
    main()

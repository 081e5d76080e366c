"""Grokking training step: `final_logits` (last block's MLP and unembedding on the `=` position only)
against the plain forward `model(tokens)[:, -1]`, same model, data and optimiser, measured in one run.

    .venv/bin/python benchmarks/toys_grokking_step.py [--p 113] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechscope.model.transformer import HookedTransformer
from mechscope.toys import fourier
from mechscope.toys.modular import GrokkingConfig, final_logits, modular_addition_data


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--p", type=int, default=113)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = GrokkingConfig(p=args.p)
    data = modular_addition_data(cfg.p, cfg.frac_train, cfg.data_seed)
    x, y = data.tokens[data.train_idx], data.labels[data.train_idx]
    model = HookedTransformer(cfg.model_config()).init_weights(seed=0, std=cfg.d_model**-0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    paths = {"final_logits": lambda: final_logits(model, x), "model(tokens)[:, -1]": lambda: model(x)[:, -1]}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for step in range(args.steps + 2):
        for name, forward in paths.items():  # interleaved so both see the same machine load
            start = time.perf_counter()
            fourier.modular_loss(forward()[:, : cfg.p], y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:  # warm-up
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"p={cfg.p}, {len(y)} training pairs, {args.threads} thread(s), median of {args.steps} steps")
    for name, t in medians.items():
        print(f"  {name:<22} {t * 1000:8.1f} ms/step")
    print(f"  speed-up of final_logits: {medians['model(tokens)[:, -1]'] / medians['final_logits']:.2f}x")


if __name__ == "__main__":
    main()

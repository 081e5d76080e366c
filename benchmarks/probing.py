"""Probe fitting against scikit-learn, and Othello game generation speed.

Probe fitting: ``--rows`` x ``--d`` activations (default 100,000 x 576, the width of SmolLM2's
residual stream) with ``--targets`` three-class targets (default 64, as the squares of an 8x8
board). The activations are synthetic (Gaussian, shifted and unevenly scaled like residual
streams) and each target's class is the argmax of a noisy linear readout, so every probe has
something to find. Timed on one process with ``torch.set_num_threads(--threads)``, the three
contenders interleaved round by round (``common.interleave``: ``--rounds`` rounds, rotated order,
samples taken while other processes used more than the gate retaken; median and spread):

  * mechscope ``fit_logistic`` over all targets as one batched fit: full batch (L-BFGS) and
    minibatch (Adam, ``--epochs`` passes of 4096 rows);
  * scikit-learn ``LogisticRegression`` (lbfgs, multinomial, the same L2 as ``C = 1 / (l2 n)``,
    its default tolerance), one fit per target, on ``--sklearn-targets`` targets; its time for
    all targets is that time scaled by ``targets / sklearn_targets`` (the fits are independent
    and alike), and says so.

Test accuracy (a fifth of the rows held out) is reported for each, on the targets sklearn fitted.

Othello: random legal games per second (generation alone, and with every label) for 6x6 and
8x8, ``--games`` games in one batch, against the plain one-square-at-a-time engine the tests use
as their oracle (``--games / 20`` games, one by one), interleaved in the same rounds.

Usage: .venv/bin/python benchmarks/probing.py [--rows 100000] [--d 576] [--targets 64]
       [--sklearn-targets 4] [--games 20000] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def synthetic(rows: int, d: int, targets: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen) * torch.linspace(0.3, 3.0, d) + torch.randn(d, generator=gen)
    readout = torch.randn(targets, d, 3, generator=gen) / d**0.5
    labels = torch.empty(rows, targets, dtype=torch.long)
    for start in range(0, rows, 10_000):
        block = x[start : start + 10_000]
        scores = torch.einsum("nd,tdc->ntc", (block - block.mean(0)) / block.std(0), readout)
        labels[start : start + 10_000] = (scores + 0.5 * torch.randn(scores.shape, generator=gen)).argmax(-1)
    return x, labels


def bench_probes(args) -> dict:
    from sklearn.linear_model import LogisticRegression

    from mechscope.probing import ProbeConfig, fit_logistic

    x, y = synthetic(args.rows, args.d, args.targets)
    n_train = int(0.8 * args.rows)
    xt, yt, xv, yv = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
    l2 = 1e-4
    out = {"rows": args.rows, "d": args.d, "targets": args.targets, "threads": args.threads}
    configs = {
        "mechscope_full_batch": ProbeConfig(l2=l2, max_iter=args.max_iter),
        "mechscope_minibatch": ProbeConfig(l2=l2, batch_size=4096, epochs=args.epochs, lr=1e-2),
    }
    mean, std = xt.mean(0), xt.std(0)
    xs_train, xs_test = ((xt - mean) / std).numpy(), ((xv - mean) / std).numpy()  # standardised, as mechscope's default

    def ours(cfg):
        def job():
            probe = fit_logistic(xt, yt, cfg, n_classes=3)
            return probe.evaluate(xv, yv)["accuracy"]

        return job

    def sklearn_job():
        acc = []
        for t in range(args.sklearn_targets):
            clf = LogisticRegression(C=1 / (l2 * n_train), max_iter=1000)
            clf.fit(xs_train, yt[:, t].numpy())
            acc.append(float((torch.tensor(clf.predict(xs_test)) == yv[:, t]).float().mean()))
        return acc

    def timed_fit(job):
        def run() -> dict:  # the fit's own time: the accuracy evaluation is not counted
            start = time.perf_counter()
            value = job()
            return {"seconds": time.perf_counter() - start, "value": value}

        return run

    jobs = {name: timed_fit(ours(cfg)) for name, cfg in configs.items()}
    jobs["sklearn"] = timed_fit(sklearn_job)
    timed = common.interleave(jobs, reps=args.rounds, max_other=args.gate)
    for name in configs:
        acc = timed[name]["last"]["value"]
        out[name] = {"seconds": timed[name]["median_s"], "spread": timed[name]["spread"],
                     "test_accuracy_first": acc[: args.sklearn_targets].tolist(),
                     "test_accuracy_mean": float(acc.mean())}  # fmt: skip
    sk = timed["sklearn"]
    out["sklearn"] = {"seconds_for_fitted": sk["median_s"], "spread": sk["spread"],
                      "fitted_targets": args.sklearn_targets,
                      "seconds_all_targets_extrapolated": sk["median_s"] * args.targets / args.sklearn_targets,
                      "test_accuracy_first": sk["last"]["value"]}  # fmt: skip
    for name in configs:
        out[name]["speedup_vs_sklearn"] = out["sklearn"]["seconds_all_targets_extrapolated"] / out[name]["seconds"]
    out["gate"] = common.gate_note(timed, args.gate)
    return out


def bench_games(args) -> dict:
    """Games per second of the vectorised engine (alone and with every label) against the plain
    one-square-at-a-time engine of the tests, interleaved round by round."""
    import random

    from mechscope.toys.othello.games import game_states, random_games

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: the tests' plain engine
    from tests.othello import reference

    out = {}
    plain_games = max(1, args.games // 20)
    for size in (6, 8):
        random_games(64, size)  # warm-up
        jobs = {
            "generate": lambda size=size: random_games(args.games, size, seed=1),
            "generate_and_label": lambda size=size: game_states(random_games(args.games, size, seed=1), size),
            "plain_engine": lambda size=size: [
                reference.random_game(size, random.Random(i)) for i in range(plain_games)
            ],
        }
        timed = common.interleave(jobs, reps=args.rounds, max_other=args.gate)
        counts = {"generate": args.games, "generate_and_label": args.games, "plain_engine": plain_games}
        rate = {name: n / timed[name]["median_s"] for name, n in counts.items()}
        moves = timed["generate"]["last"]
        out[f"{size}x{size}"] = {
            "games": args.games, "plain_engine_games": plain_games,
            "games_per_second": rate["generate"], "spread": timed["generate"]["spread"],
            "games_per_second_with_labels": rate["generate_and_label"],
            "spread_with_labels": timed["generate_and_label"]["spread"],
            "plain_engine_games_per_second": rate["plain_engine"], "plain_spread": timed["plain_engine"]["spread"],
            "speedup_vs_plain_engine": rate["generate"] / rate["plain_engine"],
            "mean_moves": float((moves >= 0).sum(1).float().mean()),
            "gate": common.gate_note(timed, args.gate),
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--sklearn-targets", type=int, default=4)
    parser.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations of the full-batch fit")
    parser.add_argument("--epochs", type=int, default=5, help="Adam epochs of the minibatch fit")
    parser.add_argument("--games", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-probes", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3 under the rules)")
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"othello": bench_games(args)}
    if not args.skip_probes:
        result["probes"] = bench_probes(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

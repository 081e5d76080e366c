"""``mechscope toys grokking|superposition|induction``: train a toy, write an HTML report and a JSON of numbers.

The flag defaults below are the toy configurations' defaults, written out so that ``--help``
needs no torch import; ``tests/cli/test_toys.py`` checks that they stay equal.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

# The choices of `mechscope.toys.fourier.KEY_FREQUENCY_RULES`, spelt here so that `--help` imports no torch
# (tests/cli/test_toys.py checks that the two agree).
KEY_FREQUENCY_RULES = ("gap", "threshold")

GROKKING_FLAGS: dict[str, tuple[str, type, object, str]] = {
    # flag: (GrokkingConfig field, type, default, help)
    "--p": ("p", int, 113, "the modulus; the vocabulary is 0 ... p-1 and the '=' token"),
    "--frac-train": ("frac_train", float, 0.3, "fraction of the p * p pairs used for training"),
    "--d-model": ("d_model", int, 128, "residual stream width"),
    "--n-heads": ("n_heads", int, 4, "attention heads"),
    "--d-mlp": ("d_mlp", int, 512, "MLP hidden width"),
    "--lr": ("lr", float, 1e-3, "AdamW learning rate"),
    "--weight-decay": ("weight_decay", float, 1.0, "AdamW (decoupled) weight decay"),
    "--epochs": ("n_epochs", int, 25000, "full-batch training steps"),
    "--stop-after-grokking": ("stop_after_grokking", int, None,
                              "stop this many epochs after test accuracy reaches 99%% (None: never)"),
    "--data-seed": ("data_seed", int, 598, "seed of the train/test split"),
    "--log-every": ("log_every", int, 50, "epochs between records of train/test loss and accuracy"),
    "--checkpoint-every": ("checkpoint_every", int, 200, "epochs between kept weights (for the progress measures)"),
}  # fmt: skip

SUPERPOSITION_FLAGS: dict[str, tuple[str, type, object, str]] = {
    # flag: (SuperpositionTraining field, or a report argument, type, default, help)
    "--n-features": ("n_features", int, 5, "features per toy model"),
    "--n-hidden": ("n_hidden", int, 2, "hidden dimensions per toy model"),
    "--n-instances": ("n_instances", int, 8, "toy models trained at once, one per feature density"),
    "--steps": ("steps", int, 5000, "Adam steps of the intro sweep"),
    "--phase-steps": ("phase_steps", int, 5000, "Adam steps of each phase-diagram model"),
    "--batch-size": ("batch_size", int, 1024, "fresh samples per step"),
    "--lr": ("lr", float, 1e-3, "Adam learning rate"),
}  # fmt: skip

INDUCTION_FLAGS: dict[str, tuple[str, type, object, str]] = {
    # flag: (InductionConfig field, type, default, help)
    "--d-vocab": ("d_vocab", int, 64, "number of token ids"),
    "--seq-len": ("seq_len", int, 32, "length of each training sequence"),
    "--d-model": ("d_model", int, 64, "residual stream width"),
    "--n-heads": ("n_heads", int, 4, "heads per layer"),
    "--d-head": ("d_head", int, None, "head width (None: d_model / n_heads)"),
    "--lr": ("lr", float, 3e-3, "AdamW learning rate"),
    "--weight-decay": ("weight_decay", float, 0.01, "AdamW weight decay"),
    "--steps": ("steps", int, 6000, "training steps"),
    "--batch-size": ("batch_size", int, 64, "sequences per step"),
    "--save-every": ("save_every", int, 500, "steps between saves of the resumable state"),
}  # fmt: skip


def _settings(args: argparse.Namespace, flags: dict[str, tuple[str, type, object, str]]) -> dict:
    return {field: getattr(args, field) for field, *_ in flags.values()}


def _grokking(args: argparse.Namespace) -> int:
    import torch

    from mechscope.cli.reports import grokking_report
    from mechscope.toys import modular

    torch.set_num_threads(args.threads)
    cfg = modular.GrokkingConfig(**_settings(args, GROKKING_FLAGS), seed=args.seed)
    out = Path(args.out)
    start = time.perf_counter()
    run = modular.train_grokking(cfg, out / "run", device=args.device or "cpu", progress=not args.quiet)
    print(f"trained {run.epoch} epochs in {time.perf_counter() - start:.0f}s (resumable state in {out / 'run'})")
    numbers = grokking_report(run, out / "grokking.html", progress=not args.quiet, rule=args.key_frequency_rule)
    print(
        f"train accuracy >= 99% at epoch {numbers['train_acc_99_epoch']}, "
        f"test accuracy >= 99% at epoch {numbers['test_acc_99_epoch']}"
    )
    print(
        f"key frequencies: {numbers['key_freqs']}; "
        f"neuron variance explained by its key frequency: {numbers['frac_explained_by_key']:.3f}"
    )
    print(f"report: {out / 'grokking.html'} and {out / 'grokking.json'}")
    return 0


def _superposition(args: argparse.Namespace) -> int:
    import torch

    from mechscope.cli.reports import superposition_report
    from mechscope.toys import superposition

    torch.set_num_threads(args.threads)
    training = superposition.SuperpositionTraining(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    phase = dataclasses.replace(training, steps=args.phase_steps)
    out = Path(args.out)
    start = time.perf_counter()
    numbers = superposition_report(
        args.n_features,
        args.n_hidden,
        args.n_instances,
        training,
        out / "superposition.html",
        phase,
        progress=not args.quiet,
        state_dir=out / "run",
    )
    print(f"trained and analysed in {time.perf_counter() - start:.0f}s (resumable state in {out / 'run'})")
    print(
        "phase diagram (rows: density 1-S; columns: importance "
        + ", ".join(f"{v:.2g}" for v in numbers["phase_diagram"]["importances"])
        + ")"
    )
    for d, row in zip(numbers["phase_diagram"]["densities"], numbers["phase_diagram"]["phases"], strict=True):
        print(f"  {d:<7.3g} " + " ".join(f"{p.split()[0][:5]:>6}" for p in row))
    print(f"report: {out / 'superposition.html'} and {out / 'superposition.json'}")
    return 0


def _induction(args: argparse.Namespace) -> int:
    import torch

    from mechscope.cli.reports import induction_report
    from mechscope.toys import induction

    torch.set_num_threads(args.threads)
    cfg = induction.InductionConfig(**_settings(args, INDUCTION_FLAGS), seed=args.seed)
    out = Path(args.out)
    start = time.perf_counter()
    run = induction.train_induction(cfg, out / "run", progress=not args.quiet)
    print(f"trained {cfg.steps} steps in {time.perf_counter() - start:.0f}s (resumable state in {out / 'run'})")
    n = induction_report(run, out / "induction.html")
    print(n["verdict"])
    if n["induction_formed"]:
        print(
            f"previous-token head {n['previous_token_head']} (tied {n['top_previous_token_heads']}), induction head "
            f"{n['induction_head']} (tied {n['top_induction_heads']}); highest K-composition pair "
            f"{n['k_composition_best_pair']}, by ablation {n['k_composition_ablation_best_pair']}"
        )
    else:
        print(f"train longer (--steps; the default is {induction.InductionConfig().steps}) or see docs/toys.md")
    print(f"report: {out / 'induction.html'} and {out / 'induction.json'}")
    return 0


def add_toys_parser(
    sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
) -> None:
    """Register ``mechscope toys grokking|superposition|induction`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_toys_parser(parser.add_subparsers())
        >>> parser.parse_args(["toys", "grokking", "--p", "11"]).p
        11
    """
    toys = sub.add_parser(
        "toys",
        help="train a toy model (grokking, superposition, induction) and write a report",
        description="Train a toy model and write an HTML report and a JSON of its numbers.",
        formatter_class=formatter_class,
    )
    kinds = toys.add_subparsers(dest="toy", required=True, metavar="{grokking,superposition,induction}")

    def add(name: str, text: str, flags: dict, out: str, func) -> argparse.ArgumentParser:
        p = kinds.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + ".", formatter_class=formatter_class
        )
        p.add_argument("--out", default=out, help="output directory for the report (and resumable state)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and of the data")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "--threads", type=int, default=1, help="torch CPU threads (the toys are too small to gain from more)"
        )
        for flag, (field, kind, default, text) in flags.items():
            p.add_argument(
                flag, dest=field, type=kind, default=default, help=text, metavar=flag[2:].upper().replace("-", "_")
            )
        p.set_defaults(func=func)
        return p

    g = add(
        "grokking",
        "modular addition; the defaults are the paper's (25,000 epochs: hours on CPU)",
        GROKKING_FLAGS,
        "toys-grokking",
        _grokking,
    )
    g.add_argument("--device", default="cpu", help="device to train on (cpu or cuda)")
    g.add_argument(
        "--key-frequency-rule",
        choices=KEY_FREQUENCY_RULES,
        default="gap",
        help="how the analysis picks key frequencies: 'gap' cuts at the largest drop between neighbouring sorted "
        "Fourier norms; 'threshold' keeps every frequency above 0.1 x the strongest (the old rule)",
    )
    add(
        "superposition",
        "ReLU-output toy models, feature geometry and the phase diagram",
        SUPERPOSITION_FLAGS,
        "toys-superposition",
        _superposition,
    )
    add(
        "induction",
        "2-layer attention-only transformer on repeated random spans",
        INDUCTION_FLAGS,
        "toys-induction",
        _induction,
    )

"""``mechscope sae train|eval``: train the SAEs of a run config, evaluate saved SAEs.

The run-config format is described in `mechscope.sae.run`; training and evaluation live there
and return data, this module prints it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

CONFIG_EXAMPLE = """\
A run config is JSON (or the same keys in TOML); every key is optional except "saes". This one is
examples/sae_topk.json in the source repository (text null: the default corpus, downloaded once):
  {"model": "smollm2-135m", "text": null, "context_size": 128, "batch_size": 4096,
   "model_batch_size": 8, "eval_sequences": 16,
   "saes": [{"architecture": "topk", "hook_name": "blocks.6.hook_resid_post", "expansion": 4, "k": 32}],
   "train": {"steps": 1000, "lr": 0.0002, "lr_warmup_steps": 50, "lr_decay_steps": 200,
             "checkpoint_dir": "saes/checkpoint", "checkpoint_every": 100},
   "out_dir": "saes"}
Its 1000 steps of 4096 tokens take hours on a CPU; try it with --steps 20 first. A killed run
resumes from its checkpoint when started again with the same settings. Every key: the
docstrings of mechscope.sae.run.RunConfig and mechscope.sae.TrainConfig.
"""


def eval_lines(result: dict[str, Any], keys: Iterable[str] | None = None, width: int = 28) -> list[str]:
    """One line per number of an evaluation result (``keys`` picks and orders them).

    Example:
        >>> eval_lines({"path": "saes/00", "l0": 31.5, "n_tokens": 64, "density_histogram": [1]})
        ['  l0                           31.5000', '  n_tokens                     64']
    """
    keys = [k for k in result if k not in ("path", "density_histogram")] if keys is None else keys
    lines = []
    for key in keys:
        value = result.get(key)
        if value is None:
            continue
        lines.append(f"  {key:<{width}} {value:.4f}" if isinstance(value, float) else f"  {key:<{width}} {value}")
    return lines


def _print_eval(result: dict[str, Any]) -> None:
    print(f"\n{result['path']}")
    for line in eval_lines(result):
        print(line)


def cli_train(args: argparse.Namespace) -> int:
    """``mechscope sae train --config FILE [--out-dir DIR] [--steps N] [--no-eval]``.

    Example:
        >>> from mechscope.cli import build_parser
        >>> cli_train(build_parser().parse_args(["sae", "train", "--config", "run.json"]))  # doctest: +SKIP
    """
    from dataclasses import asdict

    from mechscope.sae import distributed as ddp
    from mechscope.sae.run import RunConfig, evaluate_from_config, train_from_config
    from mechscope.sae.trainer import TrainConfig

    run = RunConfig.from_file(args.config)
    if args.out_dir:
        run.out_dir = args.out_dir
    if args.steps:
        run.train = TrainConfig.from_dict({**asdict(run.train), "steps": args.steps})
    saes, summary = train_from_config(run)
    if ddp.rank_and_world()[0] == 0:
        print(
            f"trained {len(saes)} SAE(s) on {summary['tokens']:,} tokens in {summary['seconds']:.1f}s "
            f"({summary['tokens_per_second']:,.0f} tokens/s)"
        )
        for key, value in summary["last"].items():
            print(f"  {key:<12} {value:.4g}")
        for path in summary["paths"]:
            print(f"saved {path}")
        if run.eval_sequences and not args.no_eval:
            for result in evaluate_from_config(run, summary["paths"]):
                _print_eval(result)
    return 0


def cli_eval(args: argparse.Namespace) -> int:
    """``mechscope sae eval [--config FILE] SAE_DIR...``.

    Example:
        >>> from mechscope.cli import build_parser
        >>> cli_eval(build_parser().parse_args(["sae", "eval", "saes/00-blocks.6.hook_resid_post"]))  # doctest: +SKIP
    """
    from mechscope.sae.run import RunConfig, evaluate_from_config

    run = RunConfig.from_file(args.config) if args.config else RunConfig(saes=[{}])
    for result in evaluate_from_config(run, args.sae):
        _print_eval(result)
    return 0


def add_sae_parser(sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter) -> None:
    """Register ``mechscope sae train|eval`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_sae_parser(parser.add_subparsers())
        >>> parser.parse_args(["sae", "train", "--config", "run.json"]).func.__name__
        'cli_train'
    """
    p = sub.add_parser(
        "sae",
        help="train or evaluate sparse autoencoders from a config file",
        description="Train or evaluate sparse autoencoders.",
        formatter_class=formatter_class,
    )
    actions = p.add_subparsers(dest="sae_command", required=True, metavar="{train,eval}")
    train = actions.add_parser(
        "train",
        help="train the SAEs of a run config (works under torchrun)",
        description="Train the SAEs of a run config from shared model passes and save them.",
        epilog=CONFIG_EXAMPLE,
        formatter_class=_with_epilog(formatter_class),
    )
    train.add_argument(
        "--config",
        required=True,
        help="run config (.json or .toml), e.g. examples/sae_topk.json; format below",
    )
    train.add_argument("--out-dir", default=None, help="where to save the SAEs (None: the config's out_dir)")
    train.add_argument("--steps", type=int, default=None, help="training steps (None: the config's train.steps)")
    train.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    train.set_defaults(func=cli_train)
    evaluate = actions.add_parser(
        "eval",
        help="evaluate saved SAEs (any supported file layout)",
        description="Evaluate saved SAEs on the held-out sequences of a run config.",
        formatter_class=formatter_class,
    )
    evaluate.add_argument("sae", nargs="+", help="SAE folders or files")
    evaluate.add_argument(
        "--config",
        default=None,
        help="run config for the model, text and eval_sequences (None: the bundled model and the default corpus)",
    )
    evaluate.set_defaults(func=cli_eval)


def _with_epilog(formatter_class: type[argparse.HelpFormatter]) -> type[argparse.HelpFormatter]:
    """``formatter_class`` that keeps the epilog's line breaks (for the config example)."""

    class Formatter(argparse.RawDescriptionHelpFormatter, formatter_class):
        pass

    return Formatter

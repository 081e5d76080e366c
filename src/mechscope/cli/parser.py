"""The ``mechscope`` argument parser and its entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mechscope.cli.browse import add_browse_parser
from mechscope.cli.circuit import add_circuit_parser
from mechscope.cli.features import add_features_parser
from mechscope.cli.othello import add_othello_parser
from mechscope.cli.probe import add_probe_parser
from mechscope.cli.sae import add_sae_parser
from mechscope.cli.subspace import add_subspace_parser
from mechscope.cli.tour import DEFAULT_PROMPT, tour
from mechscope.cli.toys import add_toys_parser
from mechscope.errors import MechscopeError

DESCRIPTION = (
    "Mechanistic interpretability of transformer language models. "
    "'mechscope tour' loads the bundled model and walks through predictions, the activation cache, "
    "generation and attention heads; 'mechscope toys' and 'mechscope sae' train toy models and sparse autoencoders."
)


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


COMMANDS = "{tour,toys,sae,circuit,subspace,probe,othello,features,browse}"


def build_parser() -> argparse.ArgumentParser:
    """The ``mechscope`` parser and every subcommand (building it imports no torch).

    Example:
        >>> args = build_parser().parse_args(["tour", "--no-heads", "--top-k", "3"])
        >>> args.no_heads, args.top_k, args.func.__name__
        (True, 3, 'tour')
    """
    parser = argparse.ArgumentParser(prog="mechscope", description=DESCRIPTION, formatter_class=Formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar=COMMANDS)
    p = sub.add_parser(
        "tour",
        help="load the bundled model, predict, and summarise an activation cache",
        description="Load a model, show its next-token predictions and summarise a full activation "
        "cache; then generation, the top attention heads and the optional sections. Times are of the "
        "whole command on two idle CPU cores (an option's with --no-heads --no-generate), the model "
        "already converted (the first load converts it once: 29 s); the default tour takes 9 s.",
        formatter_class=Formatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory, .gguf file or hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to predict from and to continue")
    p.add_argument("--top-k", type=int, default=10, help="how many next-token predictions to show")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda (None: cuda when available)")
    p.add_argument("--no-heads", action="store_true", help="skip the head detectors section")
    p.add_argument("--no-generate", action="store_true", help="skip the generation section")
    p.add_argument("--out-dir", default="mechscope-tour", help="where HTML views are written")
    p.add_argument(
        "--toys",
        action="store_true",
        help="also train reduced versions of the toy models (grokking, superposition, induction; 22 s)",
    )
    p.add_argument(
        "--sae",
        action="store_true",
        help="also train and evaluate a small TopK SAE (150 steps of 1024 tokens), harvest its features over 16k "
        "tokens into a database and one page per feature (67 s with the model and corpus cached; the first run "
        "also converts the model, downloads and tokenises the corpus, about 1 minute more)",
    )
    p.add_argument(
        "--ioi",
        action="store_true",
        help="also run IOI activation patching and AtP* with an HTML "
        "report (quick: 4 prompts, the residual stream at every third layer; 32 s)",
    )
    p.add_argument(
        "--ioi-full",
        action="store_true",
        help="the IOI section with 8 prompts and every layer (65 s)",
    )
    p.add_argument(
        "--vision",
        nargs="?",
        const="random",
        default=None,
        metavar="DIR",
        help="instead, the vision tour on synthetic shape images: patch attention, zero-shot lens over layers, "
        "a patching heatmap; on a random tiny CLIP (28 s on two busy cores), or on the CLIP, SigLIP or ViT "
        "checkpoint directory DIR",
    )
    p.set_defaults(func=tour)
    add_toys_parser(sub, Formatter)
    add_sae_parser(sub, Formatter)
    for add in (
        add_circuit_parser,
        add_subspace_parser,
        add_probe_parser,
        add_othello_parser,
        add_features_parser,
        add_browse_parser,
    ):
        add(sub, Formatter)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mechscope`` with ``argv`` (default: the command line); returns the exit status.

    A `mechscope.errors.MechscopeError` is shown as one line on stderr (status 2); any other
    error propagates with its traceback.

    Example:
        >>> main(["sae", "train", "--config", "missing.json"])
        2
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MechscopeError as exc:
        print(f"mechscope: error: {exc}", file=sys.stderr)
        return 2

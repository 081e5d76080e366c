"""Every screen of mechscope: the ``mechscope`` command, its tour, the toys and SAE commands, reports.

The library returns data; this package parses arguments, prints and writes reports. Modules here
import torch and the method packages inside the command functions, so ``mechscope --help``
stays fast.

- `mechscope.cli.parser`: `build_parser` and `main` (the console script).
- `mechscope.cli.tour`: ``mechscope tour`` and its sections (generation, heads, toys, SAE, IOI).
- `mechscope.cli.toys`, `mechscope.cli.sae`: ``mechscope toys ...`` and ``mechscope sae train|eval``.
- `mechscope.cli.reports`, `mechscope.cli.figures`: the toy and IOI reports, and the HTML/PNG writing.

Example:
    >>> from mechscope.cli import build_parser
    >>> build_parser().parse_args(["toys", "induction", "--steps", "20"]).steps
    20
"""

from mechscope.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]

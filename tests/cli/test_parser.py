"""The ``mechscope`` parser: help on every flag, fast ``--help``, errors shown or propagated."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

import mechscope
from mechscope.cli import build_parser, main
from mechscope.cli import parser as parser_module
from mechscope.errors import ConfigError

HELP_ARGVS = [[], ["tour"], ["toys"], ["toys", "grokking"], ["toys", "superposition"], ["toys", "induction"],
              ["sae"], ["sae", "train"], ["sae", "eval"]]  # fmt: skip
HEAVY = ("torch", "plotly", "transformers")


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    yield path, parser
    for action in parser._actions:  # argparse has no public listing of a parser's actions
        if isinstance(action.choices, dict):  # the subcommands
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _help_imports(prelude: str = "") -> subprocess.CompletedProcess:
    """Run ``--help`` of every command in a fresh interpreter and fail there if a heavy module got imported."""
    code = "\n".join([
        "import sys", prelude, "from mechscope.cli import main",
        f"for argv in {HELP_ARGVS!r}:",
        "    try:",
        "        main(argv + ['--help'])",
        "    except SystemExit as exc:",
        "        assert exc.code == 0, argv",
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]",
        "assert not heavy, f'--help imported {heavy}'",
    ])  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_every_flag_has_help_and_shows_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line wrapping in the help texts
    for path, parser in _parsers(build_parser()):
        text = parser.format_help()
        for action in parser._actions:
            if "-h" in action.option_strings or isinstance(action.choices, dict):
                continue
            assert action.help, (path, action.option_strings or action.dest)
            if action.option_strings and not action.required:
                if "(default:" in action.help:  # the help says what the default means: said once
                    assert f"{action.help} (default: {action.default})" not in text, (path, action.option_strings)
                else:
                    assert f"(default: {action.default})" in text, (path, action.option_strings)


def test_top_level_help_has_no_rest_markup():
    text = build_parser().format_help()
    assert "``" not in text and "`" not in text


def test_help_of_the_cli_modules_imports_no_torch():
    """The cli package itself imports torch only inside commands (the package ``__init__`` bypassed)."""
    package = str(Path(mechscope.__file__).parent)
    prelude = (f"import types; pkg = types.ModuleType('mechscope'); pkg.__path__ = [{package!r}]; "
               "sys.modules['mechscope'] = pkg")  # fmt: skip
    result = _help_imports(prelude)
    assert result.returncode == 0, result.stderr


def test_mechscope_help_imports_no_torch():
    result = _help_imports()
    assert result.returncode == 0, result.stderr


def test_toy_flag_defaults_are_the_configs_defaults():
    from mechscope.cli.toys import GROKKING_FLAGS, INDUCTION_FLAGS, SUPERPOSITION_FLAGS
    from mechscope.toys import GrokkingConfig, InductionConfig, SuperpositionTraining

    for flags, config in ((GROKKING_FLAGS, GrokkingConfig), (INDUCTION_FLAGS, InductionConfig),
                          (SUPERPOSITION_FLAGS, SuperpositionTraining)):  # fmt: skip
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        shared = [(flag, field, default) for flag, (field, _, default, _) in flags.items() if field in defaults]
        assert shared and all(default == defaults[field] for _, field, default in shared), (config, shared)
    assert all(field in {f.name for f in dataclasses.fields(GrokkingConfig)} for field, *_ in GROKKING_FLAGS.values())


def test_library_errors_are_one_line_and_others_propagate(monkeypatch, capsys):
    assert main(["sae", "train", "--config", "missing.json"]) == 2
    assert capsys.readouterr().err.strip() == "mechscope: error: missing.json: config file not found"

    def fail(args):
        raise ConfigError("bad option") if args.prompt == "library" else RuntimeError("a bug")

    monkeypatch.setattr(parser_module, "tour", fail)
    assert main(["tour", "--prompt", "library"]) == 2
    assert "mechscope: error: bad option" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="a bug"):
        main(["tour", "--prompt", "other"])

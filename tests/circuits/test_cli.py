"""``mechscope circuit``: flags, and one end-to-end run on the bundled model."""

from __future__ import annotations

import argparse
import json

import pytest

from mechscope.circuits import Circuit
from mechscope.cli.circuit import add_circuit_parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechscope")
    add_circuit_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_flags():
    args = _parser().parse_args(["circuit", "--task", "greater-than", "--method", "acdc", "--threshold", "0.1"])
    assert (args.task, args.method, args.threshold, args.edges) == ("greater-than", "acdc", 0.1, 200)
    with pytest.raises(SystemExit):
        _parser().parse_args(["circuit", "--method", "eap-gi"])


@pytest.mark.slow
def test_end_to_end(tmp_path, capsys):
    out = tmp_path / "ioi"
    args = _parser().parse_args(
        ["circuit", "--task", "ioi", "--method", "eap", "--edges", "30", "--n-prompts", "2", "--sizes", "10,30",
         "--out", str(out), "--quiet", "--device", "cpu"]
    )  # fmt: skip
    assert args.func(args) == 0
    circuit = Circuit.load(out / "circuit.json")
    assert circuit.n_edges == 30 and circuit.method == "eap" and circuit.settings["task"] == "ioi"
    curve = json.loads((out / "faithfulness.json").read_text())
    assert curve["sizes"] == [10, 30] and len(curve["faithfulness"]) == 2
    for name in ("graph.html", "graph.svg", "graph.dot", "graph.png", "faithfulness.png"):
        assert (out / name).stat().st_size > 0
    assert "faithfulness" in capsys.readouterr().out

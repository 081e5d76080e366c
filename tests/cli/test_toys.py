"""``mechscope toys ...``: each subcommand trains, writes a self-contained HTML report and a JSON of numbers."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # the toys are tiny: one thread avoids synchronisation overhead


def _check_report(path, title):
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and title in text
    assert len(text) > 1_000_000 and "plotly" in text  # plotly.js inlined, no CDN
    assert '<script src="http' not in text and "<script src='http" not in text
    return json.loads(path.with_suffix(".json").read_text())


def test_toys_grokking_cli_writes_report_and_resumes(tmp_path, capsys):
    flags = "--p 11 --d-model 16 --d-mlp 32 --epochs 20 --log-every 5 --checkpoint-every 10"
    argv = ["toys", "grokking", *flags.split(), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    numbers = _check_report(tmp_path / "grokking.html", "grokking")
    assert numbers["epochs_trained"] == 20 and len(numbers["progress_measures"]) == 3
    assert {"restricted_loss", "excluded_loss"} <= set(numbers["progress_measures"][0])
    assert "key frequencies" in capsys.readouterr().out
    assert main(argv[:9] + ["30"] + argv[10:]) == 0  # more epochs: resumes from the saved state
    assert json.loads((tmp_path / "grokking.json").read_text())["epochs_trained"] == 30


def test_toys_grokking_key_frequency_rule_flag(tmp_path, capsys):
    from mechscope.cli.toys import KEY_FREQUENCY_RULES
    from mechscope.toys import fourier

    assert KEY_FREQUENCY_RULES == fourier.KEY_FREQUENCY_RULES
    flags = "--p 13 --d-model 16 --d-mlp 32 --epochs 10 --log-every 5 --checkpoint-every 10"
    argv = ["toys", "grokking", *flags.split(), "--out", str(tmp_path), "--quiet"]
    for rule in ("threshold", "gap"):  # the second run reanalyses the saved state
        assert main([*argv, "--key-frequency-rule", rule]) == 0
        numbers = json.loads((tmp_path / "grokking.json").read_text())
        norms = torch.tensor(numbers["embed_freq_norms"])
        assert numbers["key_frequency_rule"] == rule
        assert numbers["key_freqs_embed"] == fourier.key_frequencies_from_norms(norms, rule=rule)
    assert f"key frequencies: {numbers['key_freqs']}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--key-frequency-rule", "largest"])
    assert "threshold" in capsys.readouterr().err


def test_toys_superposition_cli(tmp_path, capsys):
    flags = "--steps 100 --phase-steps 100 --n-instances 2 --batch-size 128"
    assert main(["toys", "superposition", *flags.split(), "--out", str(tmp_path), "--quiet"]) == 0
    numbers = _check_report(tmp_path / "superposition.html", "superposition")
    assert len(numbers["feature_dimensionality"]) == 2 and len(numbers["phase_diagram"]["phases"]) == 8
    assert "phase diagram" in capsys.readouterr().out
    for part in ("intro", "phase"):
        assert torch.load(tmp_path / "run" / part / "state.pt", weights_only=True)["step"] == 100


def test_toys_induction_cli_writes_report_and_resumes(tmp_path):
    flags = "--d-vocab 16 --seq-len 12 --d-model 16 --steps 20"
    argv = ["toys", "induction", *flags.split(), "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    numbers = _check_report(tmp_path / "induction.html", "Induction")
    assert len(numbers["k_composition"]) == 4
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 20
    assert main(argv[:9] + ["30"] + argv[10:]) == 0  # more steps: resumes from the saved state
    assert torch.load(tmp_path / "run" / "state.pt", weights_only=True)["step"] == 30
    assert json.loads((tmp_path / "induction.json").read_text())["history"][-1]["step"] == 29


def test_toys_needs_a_known_toy(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["toys", "othello"])
    assert "grokking" in capsys.readouterr().err
    assert build_parser().parse_args(["tour", "--toys"]).toys

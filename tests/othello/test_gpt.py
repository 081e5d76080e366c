"""Othello-GPT at CI size: one small training run shared by the tests (module fixture), then
probes and interventions on it; resumability on a tiny run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import InputError
from mechscope.probing import ProbeConfig
from mechscope.toys.othello.games import random_games
from mechscope.toys.othello.train import OthelloConfig, PackedGames, load_othello, make_data, train_othello
from mechscope.toys.othello.world import board_probes, intervene

CI_CONFIG = OthelloConfig(size=6, n_layers=2, d_model=64, n_heads=2, n_games=4000, steps=500, batch_size=64, lr=3e-3,
                          warmup=50, eval_games=300, seed=0)  # fmt: skip
CI_ACCURACY = 0.80
"""Held-out legal-move top-1 accuracy the CI run must reach (see docs/othello.md for full runs)."""


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("othello")
    run = train_othello(CI_CONFIG, out, progress=False)
    yield run, out
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def ci_probes(ci_run):
    run, _ = ci_run
    return board_probes(run.model, 6, n_games=400, seed=5, cfg=ProbeConfig(l2=1e-3, batch_size=2048, epochs=10))


def test_ci_model_plays_legal_moves(ci_run):
    run, out = ci_run
    assert run.eval["accuracy"] >= CI_ACCURACY, run.eval["accuracy"]
    assert run.history[-1]["loss"] < run.history[0]["loss"] - 0.5
    model, cfg, meta = load_othello(out)
    assert cfg == CI_CONFIG and meta["eval"]["accuracy"] == run.eval["accuracy"]
    tokens = make_data(random_games(3, 6, seed=9), 6).tokens
    assert_close(model(tokens), run.model(tokens))


def test_board_probes_read_the_board(ci_probes):
    table = ci_probes.table()
    last = table[-1]
    first = table[0]  # the embedding alone sees one move: it cannot know the board
    assert last["mine_theirs_playable"] > first["mine_theirs_playable"] + 0.05
    for row in table[1:]:  # after the first block: mine/theirs reads better than black/white
        assert row["mine_theirs_playable"] > row["black_white_playable"] + 0.01, row


def test_probe_edits_beat_random_edits(ci_run, ci_probes):
    run, _ = ci_run
    hook = ci_probes.hooks[-1]
    result = intervene(run.model, ci_probes.relative[hook], 6, n_positions=150, seed=3).summary()
    assert result["flipped_probe"] > 0.5
    assert result["probe_mean_errors"] < result["random_mean_errors"]
    # without an edit the model is closer to the original board than to the edited one
    assert result["none_original_mean_errors"] < result["none_mean_errors"]


@pytest.mark.parametrize("size", [6, 8])
def test_packed_and_chunked_targets_equal_one_replay(size):
    moves = random_games(23, size, seed=size)
    whole = make_data(moves, size, chunk=64)
    chunked = make_data(moves, size, chunk=5)
    rows = torch.tensor([22, 0, 7, 7, 13])
    batch = PackedGames(moves, size, chunk=4).batch(rows)
    for field in dataclasses.fields(whole):
        expected = getattr(whole, field.name)
        assert torch.equal(getattr(chunked, field.name), expected)
        got = getattr(batch, field.name)
        assert got.dtype == expected.dtype and torch.equal(got, expected[rows]), field.name
    assert int(whole.legal[..., -1].sum()) > 0  # the highest token's bit (bit 60 on 8x8) is used
    with pytest.raises(InputError, match="chunk must be a positive"):
        PackedGames(moves, size, chunk=0)


def test_settings_that_cannot_work_are_named(ci_run):
    from mechscope.errors import ConfigError

    with pytest.raises(ConfigError, match="lr > 0"):
        OthelloConfig(lr=-1e-3)
    with pytest.raises(ConfigError, match="warmup >= 0"):
        OthelloConfig(warmup=-1)
    run, _ = ci_run
    with pytest.raises(InputError, match="use at least 3 groups"):
        board_probes(run.model, 6, n_games=2)
    with pytest.raises(InputError, match="test_fraction must be in"):
        board_probes(run.model, 6, n_games=20, test_fraction=1.0)


def test_training_resumes_to_the_same_weights(tmp_path):
    small = OthelloConfig(n_layers=1, d_model=16, n_heads=2, n_games=64, steps=6, batch_size=8, warmup=2,
                          eval_games=8, save_every=3)  # fmt: skip
    whole = train_othello(small, progress=False)
    train_othello(dataclasses.replace(small, steps=3), tmp_path, progress=False)
    resumed = train_othello(small, tmp_path, progress=False)
    for name, value in whole.model.state_dict().items():
        assert_close(resumed.model.state_dict()[name], value)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]


def test_cli_probe_then_intervene_use_each_layers_own_probe(ci_run, tmp_path, capsys):
    from mechscope.cli.parser import main
    from mechscope.probing import LinearProbe

    _, run_dir = ci_run
    probes = tmp_path / "probes"
    assert main(["othello", "probe", "--run", str(run_dir), "--games", "40", "--epochs", "2", "--threads", "1",
                 "--quiet", "--out", str(probes)]) == 0  # fmt: skip
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(CI_CONFIG.n_layers)]
    for hook in ["blocks.0.hook_resid_pre", *hooks]:  # one probe per hook, none overwritten
        assert LinearProbe.load(probes / f"mine_theirs.{hook}").hook == hook
        assert LinearProbe.load(probes / f"black_white.{hook}").hook == hook
    out = tmp_path / "interventions.json"
    assert main(["othello", "intervene", "--run", str(run_dir), "--probes", str(probes), "--positions", "12",
                 "--threads", "1", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())
    assert [r["hook"] for r in rows] == hooks
    assert "layer 1: top-N errors" in capsys.readouterr().out
    bad_args = [(["--layers", str(CI_CONFIG.n_layers)], "not blocks of this"),
                (["--layers", "-1"], "not blocks of this"), (["--positions", "0"], "n_positions")]  # fmt: skip
    for bad, message in bad_args:
        assert main(["othello", "intervene", "--run", str(run_dir), "--probes", str(probes), "--quiet",
                     "--threads", "1", "--out", str(tmp_path / "bad.json"), *bad]) == 2  # fmt: skip
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.json").exists()

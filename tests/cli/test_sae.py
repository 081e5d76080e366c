"""Config-driven training and evaluation, and the `mechscope sae` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mechscope.cli import build_parser
from mechscope.errors import ConfigError
from mechscope.sae import load_sae
from mechscope.sae.run import RunConfig, evaluate_from_config, train_from_config

from ..conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny SAEs train faster on one thread


def test_run_config_trains_saves_and_evaluates_several_saes(tmp_path):
    model = tiny_model()
    tokens = torch.randint(0, 61, (4000,), generator=torch.Generator().manual_seed(0))
    config = {
        "saes": [
            {"architecture": "topk", "hook_name": "blocks.1.hook_resid_post", "k": 4, "expansion": 2},
            {"architecture": "standard", "hook_name": "blocks.0.ln2.hook_normalized",
             "hook_name_out": "blocks.0.hook_mlp_out"},
            {"architecture": "topk", "hook_name": "blocks.2.attn.hook_z", "k": 4},
        ],
        "context_size": 16, "batch_size": 64, "buffer_batches": 2, "eval_sequences": 4,
        "out_dir": str(tmp_path / "out"),
        "train": {"steps": 6, "lr": 1e-3},
    }  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(config))
    run = RunConfig.from_file(tmp_path / "run.json")
    saes, summary = train_from_config(run, model=model, progress=False, tokens=tokens)
    assert summary["tokens"] == 6 * 64
    assert [s.cfg.d_in for s in saes] == [32, 32, 32] and [s.cfg.d_sae for s in saes] == [64, 128, 128]
    assert saes[1].cfg.is_transcoder and saes[2].cfg.n_heads == 4
    assert len(summary["paths"]) == 3
    loaded = load_sae(summary["paths"][2])
    torch.testing.assert_close(loaded.W_dec, saes[2].W_dec)
    results = evaluate_from_config(run, summary["paths"], model=model, tokens=tokens)
    assert [r["n_tokens"] for r in results] == [64, 64, 64]
    assert all(0 <= r["fvu"] and r["ce_clean"] > 0 for r in results)


def test_run_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        RunConfig.from_dict({"saes": [{}], "batchsize": 3})
    with pytest.raises(ConfigError, match="at least one entry"):
        RunConfig.from_dict({"saes": []})
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json: cannot parse"):
        RunConfig.from_file(tmp_path / "bad.json")


def test_cli_parses_sae_commands():
    args = build_parser().parse_args(["sae", "train", "--config", "run.json", "--steps", "7"])
    assert args.config == "run.json" and args.steps == 7 and args.func.__name__ == "cli_train"
    args = build_parser().parse_args(["sae", "eval", "a", "b"])
    assert args.sae == ["a", "b"] and args.func.__name__ == "cli_eval"
    assert build_parser().parse_args(["tour", "--sae"]).sae


def test_the_example_config_is_valid_and_shown_in_the_help(monkeypatch, capsys):
    from pathlib import Path

    from mechscope.cli.sae import CONFIG_EXAMPLE

    example = Path(__file__).resolve().parents[2] / "examples" / "sae_topk.json"
    run = RunConfig.from_file(example)
    assert run.saes[0]["architecture"] == "topk" and run.train.checkpoint_every == 100
    shown = CONFIG_EXAMPLE[CONFIG_EXAMPLE.index("{") : CONFIG_EXAMPLE.rindex("}") + 1]
    assert json.loads(shown) == json.loads(example.read_text())  # the help shows the file as it is
    monkeypatch.setenv("COLUMNS", "200")
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["sae", "train", "--help"])
    text = capsys.readouterr().out
    assert "e.g. examples/sae_topk.json" in text and '"checkpoint_every": 100' in text


@pytest.mark.slow
def test_tour_sae_section_links_the_feature_pages_it_made(tmp_path, capsys):
    import mechscope as ms
    from mechscope.cli.tour import sae_section
    from mechscope.features import FeatureDB

    model = ms.load("smollm2-135m", device="cpu")
    sae_section(model, tmp_path, steps=4, layer=1, harvest_tokens=512)
    out = capsys.readouterr().out
    db = FeatureDB(tmp_path / "sae_features.db")
    assert db.count() == 4 * model.cfg.d_model
    pages = [line.split(": ")[-1] for line in out.splitlines() if line.startswith("  feature ")]
    assert len(pages) == 3
    for page in pages:  # the printed paths exist and are the pages of the strongest features
        assert Path(page).is_file() and Path(page).parent == tmp_path / "sae_features"
    strongest = {row["feature"] for row in db.search(order="-max", limit=3)}
    assert {int(Path(p).stem.rsplit("-", 1)[1]) for p in pages} == strongest
    assert (tmp_path / "sae_features" / "index.html").is_file()
    assert f"mechscope browse {tmp_path / 'sae_features.db'}" in out

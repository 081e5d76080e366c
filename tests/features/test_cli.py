"""``mechscope features harvest|export|neuronpedia`` on a tiny model folder, SAE file and text file."""

from __future__ import annotations

import argparse
import json

import pytest

from mechscope.cli.browse import add_browse_parser, check_host
from mechscope.cli.features import add_features_parser
from mechscope.errors import ConfigError
from mechscope.features import FeatureDB
from mechscope.sae import save_sae
from tests.features.conftest import CORPUS, topk_sae

# The keys of a feature and of an activation in SAEDashboard 0.8.0's Neuronpedia batches
# (sae_dashboard/neuronpedia/neuronpedia_dashboard.py, NeuronpediaDashboardFeature.to_dict and
# NeuronpediaDashboardActivation.to_dict, whose DFA keys it writes even without DFA data).
NP_BATCH = ["model_id", "layer", "sae_set", "sae_id_suffix", "features"]
NP_FEATURE = [
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str", "neg_values",
    "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset",
    "decoder_weights_dist", "activations", "vector",
]  # fmt: skip
NP_ACTIVATION = ["bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index", "dfa_values",
                 "dfa_maxValue", "dfa_targetIndex"]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mechscope")
    sub = p.add_subparsers(dest="command", required=True)
    add_features_parser(sub)
    add_browse_parser(sub)
    return p


@pytest.fixture(scope="module")
def harvested(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "text.txt").write_text("\n".join(CORPUS * 8))
    sae_dir = save_sae(topk_sae(), root / "sae")
    db = root / "features.db"
    args = parser().parse_args([
        "features", "harvest", "--model", str(model_dir), "--sae", str(sae_dir), "--neurons", "1", "--tokens", "300",
        "--text", str(root / "text.txt"), "--out", str(db), "--context-size", "16", "--batch-size", "4",
        "--device", "cpu", "--no-progress",
    ])  # fmt: skip
    assert args.func(args) == 0
    return root, db


def test_harvest_writes_a_database_with_both_sources(harvested, model_dir):
    root, db = harvested
    feature_db = FeatureDB(db)
    names = {s["name"]: s for s in feature_db.sources()}
    assert set(names) == {"blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"}
    assert names["blocks.0.hook_resid_post"]["info"]["path"].endswith("sae")
    meta = feature_db.meta()
    assert 300 <= meta["n_tokens"] < 300 + 15 and meta["model"] == str(model_dir)
    assert not (root / "features.db.harvest.ckpt").exists()


def test_export_and_neuronpedia_layout(harvested, tmp_path):
    _, db = harvested
    args = parser().parse_args(["features", "export", str(db), "--out", str(tmp_path / "site"), "--no-progress"])
    assert args.func(args) == 0
    assert (tmp_path / "site" / "index.html").is_file() and len(
        list((tmp_path / "site").glob("*.html"))
    ) == 1 + 48 + 128
    args = parser().parse_args(["features", "neuronpedia", str(db), "--out", str(tmp_path / "np"),
                                "--source", "blocks.0.hook_resid_post"])  # fmt: skip
    assert args.func(args) == 0
    batch = json.loads((tmp_path / "np" / "batch-0.json").read_text())
    assert list(batch) == NP_BATCH and batch["layer"] == 0
    feature = batch["features"][0]
    assert list(feature) == NP_FEATURE
    rec = FeatureDB(db).feature(feature["feature_index"], "blocks.0.hook_resid_post")
    assert feature["frac_nonzero"] == pytest.approx(rec.density)
    tops = [a for a in feature["activations"] if a["bin_min"] == -1]
    assert len(tops) == len(rec.top)
    for act in feature["activations"]:
        assert list(act) == NP_ACTIVATION
        assert act["values"][act["qualifying_token_index"]] > 0 and len(act["tokens"]) == len(act["values"])
    assert sum(feature["freq_hist_data_bar_heights"]) == rec.fire_count


def test_browse_refuses_remote_addresses_unless_told():
    args = parser().parse_args(["browse", "x.db"])
    assert (args.host, args.port, args.allow_remote) == ("127.0.0.1", 8765, False)
    for host in ("0.0.0.0", "192.168.1.5", "example.org"):
        with pytest.raises(ConfigError, match="--allow-remote"):
            check_host(host, False)
    check_host("0.0.0.0", True)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_host(host, False)

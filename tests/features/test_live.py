"""Test-a-prompt and steering without a browser, and the server's routes through Flask's test client."""

from __future__ import annotations

import pytest
import torch

from mechscope.cli.browse import make_app
from mechscope.errors import InputError
from mechscope.features import HarvestConfig, NeuronSource, SAESource, harvest, write_harvest
from mechscope.features.live import prompt_features, steer
from tests.features.conftest import HOSTILE, topk_sae

TEXT = "The cat sat on the mat in Paris"


def test_prompt_features_equal_sae_encode(text_model):
    sae = topk_sae()
    out = prompt_features(text_model, SAESource(sae), TEXT)
    tokens = text_model.to_tokens(TEXT)
    _, cache = text_model.run_with_cache(tokens, names_filter=sae.cfg.hook_name)
    torch.testing.assert_close(out.acts, sae.encode(cache[sae.cfg.hook_name])[0].detach(), rtol=0, atol=0)
    assert out.str_tokens == text_model.to_str_tokens(tokens[0])
    assert all(v > 0 for row in out.top(3) for _, v in row)


def test_steering_adds_and_ablates(text_model):
    sae = topk_sae()
    src = SAESource(sae)
    acts = prompt_features(text_model, src, TEXT).acts
    silent = int((acts.abs().sum(0) == 0).nonzero()[0])
    active = int(acts[-1].argmax())
    # ablation splices the SAE with its error term: the unedited output is x up to float32
    # rounding (a KL of about 1e-7, thread-count dependent), against about 0.06 for an active feature
    assert steer(text_model, src, TEXT, silent, mode="ablate")["kl"] == pytest.approx(0.0, abs=1e-5)
    assert steer(text_model, src, TEXT, active, mode="ablate")["kl"] > 1e-3
    added = steer(text_model, src, TEXT, silent, mode="add", coefficient=30.0)
    assert added["kl"] > 1e-3 and len(added["after"]) == 10
    assert sum(p for *_, p in added["before"]) <= 1.0 + 1e-6
    neuron = steer(text_model, NeuronSource(text_model, 0), TEXT, 3, mode="add", coefficient=0.0)
    assert neuron["kl"] == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(InputError, match="out of range"):
        steer(text_model, src, TEXT, sae.cfg.d_sae)


def test_server_routes_escape_and_refuse_foreign_hosts(text_model, corpus_tokens, tmp_path):
    sae = topk_sae()
    cfg = HarvestConfig(context_size=16, batch_size=4, top_k=5, pool=8, left=4, right=2, hist_bins=64)
    db = write_harvest(harvest(text_model, sae, corpus_tokens, cfg, progress=False), text_model, tmp_path / "f.db")
    client = make_app(db, text_model, {sae.cfg.hook_name: sae}).test_client()
    index = client.get("/")
    assert index.status_code == 200 and HOSTILE[0] not in index.get_data(as_text=True)
    page = client.get("/feature/blocks.0.hook_resid_post/3")
    assert page.status_code == 200 and "<script" not in page.get_data(as_text=True)
    assert client.get("/feature/blocks.0.hook_resid_post/999").status_code == 404
    got = client.post("/api/prompt", json={"text": TEXT, "source": sae.cfg.hook_name}).get_json()
    assert len(got["tokens"]) == text_model.to_tokens(TEXT).shape[1]
    assert client.post("/api/prompt", json={"text": TEXT, "source": "nope"}).status_code == 404
    assert client.post("/api/steer", json={"text": TEXT, "source": sae.cfg.hook_name, "feature": 2}).status_code == 200
    assert client.get("/search?token=%20the").status_code == 200
    assert client.get("/", headers={"Host": "evil.example:8765"}).status_code == 403
    no_model = make_app(db).test_client()
    assert no_model.post("/api/prompt", json={"text": TEXT, "source": "x"}).status_code == 409
    assert "--model" in no_model.get("/prompt").get_data(as_text=True)

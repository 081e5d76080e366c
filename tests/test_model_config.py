"""`ModelConfig` uses TransformerLens' values for its TransformerLens-named fields, rejects others
by name, and reads the configs older mechscope versions saved to the same model."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mechscope as ms
from mechscope.model.config import CONFIG_VERSION
from tests.conftest import tiny_config, tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8]])


def test_defaults_are_transformer_lens_values():
    cfg = tiny_config()
    assert (cfg.normalization_type, cfg.positional_embedding_type) == ("LN", "standard")
    assert cfg.attn_scale == math.sqrt(cfg.d_head)  # TransformerLens' divisor
    assert cfg.attn_score_factor == cfg.d_head**-0.5  # the factor on q . k, as transformers rounds it
    assert ms.ModelConfig(**{**_fields(cfg), "attn_scale": 2.5}).attn_score_factor == 0.4


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "normalization_type",
            "layernorm",
            r"'layernorm' is the old spelling of 'LN'.*\['LN', 'LNPre', 'RMS', 'RMSPre'",
        ),
        ("normalization_type", "rmsnorm", r"old spelling of 'RMS'"),
        ("normalization_type", "ln", r"unknown normalization_type 'ln'; choose one of"),
        ("positional_embedding_type", "learned", r"old spelling of 'standard'.*\['standard', 'rotary', 'none'\]"),
        ("positional_embedding_type", "alibi", r"choose one of \['standard', 'rotary', 'none'\]"),
        ("attn_scale", 0.0, r"attn_scale must be positive \(the divisor"),
    ],
)
def test_invalid_values_name_the_valid_choices(field, value, message):
    with pytest.raises(ms.ConfigError, match=message):
        tiny_config(**{field: value})


def _fields(cfg: ms.ModelConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k != "config_version"}


@pytest.mark.parametrize(
    "overrides, legacy",
    [
        ({}, {"normalization_type": "layernorm", "positional_embedding_type": "learned", "attn_scale": None}),
        (
            {"normalization_type": "RMS", "positional_embedding_type": "rotary", "attn_scale": 1 / 0.3},
            {"normalization_type": "rmsnorm", "positional_embedding_type": "rotary", "attn_scale": 0.3},
        ),
        (
            {"attn_scale": 1.0},
            {"normalization_type": "layernorm", "positional_embedding_type": "learned", "attn_scale": 1.0},
        ),
    ],
)
def test_a_version_1_config_loads_to_the_same_logits(overrides, legacy):
    """Version 1 (no ``config_version``) spelt the norms and positions its own way and saved
    ``attn_scale`` as the factor on the scores; read back, it builds the model it described."""
    model = tiny_model(**overrides)
    old = json.loads(json.dumps({**_fields(model.cfg), **legacy}))  # as a version-1 file held it
    cfg = ms.ModelConfig.from_dict(old)
    assert (cfg.normalization_type, cfg.positional_embedding_type) == (
        model.cfg.normalization_type,
        model.cfg.positional_embedding_type,
    )
    assert cfg.attn_scale == pytest.approx(model.cfg.attn_scale, rel=1e-12)
    rebuilt = ms.HookedTransformer(cfg)
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(TOKENS), model(TOKENS), atol=1e-6, rtol=1e-6)


def test_round_trip_carries_the_version():
    cfg = tiny_config(normalization_type="RMSPre", attn_scale=3.0)
    data = json.loads(cfg.to_json())
    assert data["config_version"] == CONFIG_VERSION and data["attn_scale"] == 3.0
    assert ms.ModelConfig.from_dict(data) == cfg
    with pytest.raises(ms.ConfigError, match="config_version 99"):
        ms.ModelConfig.from_dict({**data, "config_version": 99})


def test_b_u_is_zeros_without_a_bias_and_costs_nothing():
    model = tiny_model()
    assert model.cfg.unembed_bias is False and model.unembed.bias is None
    assert torch.equal(model.unembed.b_U, torch.zeros(model.cfg.d_vocab_out)) and torch.equal(
        model.b_U, model.unembed.b_U
    )
    assert "unembed.b_U" not in model.state_dict()  # still not a parameter: nothing to train or save
    model.unembed.b_U = torch.nn.Parameter(torch.arange(model.cfg.d_vocab_out, dtype=torch.float32))
    with torch.no_grad():
        shifted = model(TOKENS)
        model.unembed.b_U = None
        torch.testing.assert_close(
            shifted - model(TOKENS), model.unembed.w_u.new_tensor(range(model.cfg.d_vocab_out)).expand_as(shifted)
        )


def test_unembed_hooks_see_the_final_residual_and_the_logits():
    model = tiny_model(output_logits_soft_cap=2.0)
    logits, cache = model.run_with_cache(
        TOKENS, names_filter=["unembed.hook_in", "unembed.hook_out", "ln_final.hook_out"]
    )
    assert torch.equal(cache["unembed.hook_in"], cache["ln_final.hook_out"])
    assert torch.equal(
        torch.tanh(cache["unembed.hook_out"] / 2.0) * 2.0, logits
    )  # before the soft-cap, as TransformerLens

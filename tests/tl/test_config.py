"""HookedTransformerConfig (TransformerLens' fields and defaults) and its mapping onto ModelConfig;
ModelConfig accepts any head width for models without rotary embeddings."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.tl import HookedTransformer, HookedTransformerConfig


@pytest.mark.parametrize("d_model, n_heads, d_head", [(10, 2, None), (6, 6, None), (8, 2, 1), (9, 3, 3)])
def test_odd_and_unit_head_widths_without_rotary(d_model, n_heads, d_head):
    cfg = ms.ModelConfig(d_model=d_model, n_layers=2, n_heads=n_heads, d_head=d_head, d_mlp=12, d_vocab=11, n_ctx=8)
    model = ms.HookedTransformer(cfg).init_weights(seed=0)
    logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, 11) and cache["z", 1].shape == (1, 4, n_heads, cfg.d_head)
    assert torch.isfinite(logits).all()


def test_rotary_still_needs_an_even_width():
    with pytest.raises(ms.ConfigError, match="rotary_dim=5 must be even"):
        ms.ModelConfig(
            d_model=10, n_layers=1, n_heads=2, d_mlp=8, d_vocab=5, n_ctx=4, positional_embedding_type="rotary"
        )


def test_tl_defaults_and_mapping():
    cfg = HookedTransformerConfig(d_model=24, d_head=6, n_layers=2, n_ctx=16, d_vocab=30)
    assert (cfg.n_heads, cfg.d_mlp, cfg.act_fn, cfg.normalization_type, cfg.d_vocab_out) == (4, 96, "relu", "LN", 30)
    assert cfg.positional_embedding_type == "standard" and cfg.rotary_dim is None
    mc = cfg.to_model_config()
    assert (mc.normalization_type, mc.positional_embedding_type, mc.act_fn, mc.attn_scale) == (
        "LN",
        "standard",
        "relu",
        cfg.attn_scale,
    )
    rms = HookedTransformerConfig(
        d_model=24,
        d_head=6,
        n_layers=2,
        n_ctx=16,
        d_vocab=30,
        normalization_type="RMSPre",
        positional_embedding_type="rotary",
        attn_scale=2.0,
        n_key_value_heads=2,
    )
    mc = rms.to_model_config()
    assert (mc.normalization_type, mc.positional_embedding_type, mc.rotary_dim, mc.attn_scale) == (
        "RMSPre",
        "rotary",
        6,
        2.0,
    )
    model = HookedTransformer(rms)
    assert model.blocks[0].ln1.w is None and model.ln_final.w is None  # TransformerLens' RMSNormPre: no weights
    assert mc.n_key_value_heads == 2 and mc.n_params == cfg.n_params


@pytest.mark.parametrize(
    "field, value",
    [
        ("act_fn", "solu_ln"),
        ("positional_embedding_type", "shortformer"),
        ("attention_dir", "bidirectional"),
        ("d_vocab_out", 7),
    ],
)
def test_unsupported_fields_are_named(field, value):
    cfg = HookedTransformerConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, d_vocab=5, **{field: value})
    with pytest.raises(ms.ConfigError, match=field):
        HookedTransformer(cfg)


def test_vocab_inferred_from_tokenizer_else_named():
    cfg = HookedTransformerConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4)
    with pytest.raises(ms.ConfigError, match="d_vocab=-1"):
        HookedTransformer(cfg)

    class Tok:
        vocab = {"a": 0, "b": 6}
        padding_side = "right"

    model = HookedTransformer(cfg, tokenizer=Tok())
    assert model.cfg.d_vocab == 7 and cfg.d_vocab_out == 7


def test_weights_initialised_as_transformer_lens():
    cfg = HookedTransformerConfig(d_model=64, d_head=16, n_layers=2, n_ctx=32, d_vocab=400, seed=3)
    model = HookedTransformer(cfg)
    assert abs(float(model.W_E.detach().std()) / cfg.initializer_range - 1) < 0.05
    assert float(model.blocks[0].ln1.w.detach().sub(1).abs().max()) == 0.0
    assert float(model.blocks[1].attn.b_o.detach().abs().max()) == 0.0
    again = HookedTransformer(HookedTransformerConfig(d_model=64, d_head=16, n_layers=2, n_ctx=32, d_vocab=400, seed=3))
    assert torch.equal(model.W_E, again.W_E)  # seeded like TransformerLens: same seed, same weights
    assert model.cfg.device == "cpu" and model.cfg.n_params == cfg.n_params

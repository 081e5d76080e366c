"""Gemma 3 models whose every layer is sliding-window (fewer layers than the sliding-window
pattern) use the local RoPE base on every layer, as `transformers` does."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig

import mechscope as ms
from tests.conftest import save_hf_model

VOCAB = 97
ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}


def gemma3(**kw) -> Gemma3TextConfig:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        sliding_window=6,
        query_pre_attn_scalar=24,
        rope_parameters=ROPE,
    )
    return Gemma3TextConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "layers, types",
    [
        (4, None),  # the default pattern (5 sliding, 1 full) cut at 4 layers: all sliding
        (3, ["sliding_attention"] * 3),
        (2, ["full_attention"] * 2),
        (3, ["sliding_attention", "full_attention", "sliding_attention"]),
    ],
)
def test_layer_rope_bases_match_transformers(tmp_path, layers, types):
    hf_config = gemma3(num_hidden_layers=layers, **({} if types is None else {"layer_types": types}))
    expected_types = list(hf_config.layer_types)
    hf_model = save_hf_model(hf_config, tmp_path, seed=layers)
    model = ms.load(tmp_path, device="cpu")
    bases = [model.cfg.layer_rope(layer)[0] for layer in range(layers)]
    assert bases == [100.0 if t == "sliding_attention" else 1e6 for t in expected_types]
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(layers))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        actual = model(tokens)
    assert expected.abs().max() > 0.5, "reference logits are too small to test anything"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_all_sliding_default_pattern_is_all_sliding():
    """The case the fix is for: transformers' default pattern gives 4 sliding layers of 4."""
    assert set(gemma3().layer_types) == {"sliding_attention"}

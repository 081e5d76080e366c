"""Layer-stacked weights: TransformerLens names and shapes, equal to the blocks' weights, and
reproducing the activations they stand for (queries, keys, values, head outputs, neurons)."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


def mha_model() -> ms.HookedTransformer:
    return tiny_model(attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, unembed_bias=True)


def gqa_model() -> ms.HookedTransformer:
    return tiny_model(
        seed=1,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
    )


@pytest.mark.parametrize("build", [mha_model, gqa_model], ids=["mha", "gqa"])
def test_shapes_follow_transformer_lens(build):
    model = build()
    cfg = model.cfg
    n, h, dh, d, m = cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    expected = {
        "W_Q": (n, h, d, dh), "W_K": (n, h, d, dh), "W_V": (n, h, d, dh), "W_O": (n, h, dh, d),
        "b_Q": (n, h, dh), "b_K": (n, h, dh), "b_V": (n, h, dh), "b_O": (n, d),
        "W_in": (n, d, m), "W_out": (n, m, d), "b_in": (n, m), "b_out": (n, d),
        "W_E": (cfg.d_vocab, d), "W_U": (d, cfg.d_vocab), "b_U": (cfg.d_vocab,),
    }  # fmt: skip
    for name, shape in expected.items():
        assert tuple(getattr(model, name).shape) == shape, name
    assert tuple(model.QK.shape) == (n, h, d, d) and tuple(model.OV.shape) == (n, h, d, d)
    if cfg.gated_mlp:
        assert tuple(model.W_gate.shape) == (n, d, m)


@pytest.mark.parametrize("build", [mha_model, gqa_model], ids=["mha", "gqa"])
def test_values_are_the_blocks_weights(build):
    model = build()
    groups = model.cfg.n_kv_groups
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        assert torch.equal(model.W_Q[layer], attn.W_Q)
        assert torch.equal(model.W_O[layer], attn.W_O)
        for head in range(model.cfg.n_heads):  # grouped-query: head h reads kv head h // groups
            assert torch.equal(model.W_K[layer, head], attn.W_K[head // groups])
            assert torch.equal(model.W_V[layer, head], attn.W_V[head // groups])
        assert torch.equal(model.W_in[layer], block.mlp.W_in)
        assert torch.equal(model.W_out[layer], block.mlp.W_out)
    torch.testing.assert_close(model.QK.AB, model.W_Q @ model.W_K.transpose(-1, -2))
    torch.testing.assert_close(model.OV.AB, model.W_V @ model.W_O)


def test_missing_biases_read_as_zeros():
    model = gqa_model()
    for name in ("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "b_U"):
        bias = getattr(model, name)
        assert bias.dtype == model.dtype and not bias.any(), name


def _norm_output(model, cache, layer: int, norm: str):
    """A pre-norm's output: its ``hook_normalized`` (before the weights) times ``w``, plus ``b``."""
    ln = getattr(model.blocks[layer], norm)
    out = cache["normalized", layer, norm] * ln.w
    return out if getattr(ln, "b", None) is None else out + ln.b


def test_stacked_weights_reproduce_the_activations():
    model = mha_model()
    _, cache = model.run_with_cache(TOKENS)
    for layer in range(model.cfg.n_layers):
        x = _norm_output(model, cache, layer, "ln1")
        for site, w, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V)):
            act = torch.einsum("bpd,hde->bphe", x, w[layer]) + b[layer]
            torch.testing.assert_close(act, cache[site, layer], atol=1e-5, rtol=1e-5)
        out = torch.einsum("bphe,hed->bpd", cache["z", layer], model.W_O[layer]) + model.b_O[layer]
        torch.testing.assert_close(out, cache["attn_out", layer], atol=1e-5, rtol=1e-5)
        pre = _norm_output(model, cache, layer, "ln2") @ model.W_in[layer] + model.b_in[layer]
        torch.testing.assert_close(pre, cache["pre", layer], atol=1e-5, rtol=1e-5)
        mlp_out = cache["post", layer] @ model.W_out[layer] + model.b_out[layer]
        torch.testing.assert_close(mlp_out, cache["mlp_out", layer], atol=1e-5, rtol=1e-5)


def test_grouped_query_keys_repeat_per_query_head():
    model = gqa_model()
    _, cache = model.run_with_cache(TOKENS)
    groups = model.cfg.n_kv_groups
    for layer in range(model.cfg.n_layers):
        x = _norm_output(model, cache, layer, "ln1")
        k = torch.einsum("bpd,hde->bphe", x, model.W_K[layer]) + model.b_K[layer]
        torch.testing.assert_close(k, cache["k", layer].repeat_interleave(groups, dim=2), atol=1e-5, rtol=1e-5)
        x2 = _norm_output(model, cache, layer, "ln2")
        gate = torch.nn.functional.silu(x2 @ model.W_gate[layer]) * (x2 @ model.W_in[layer])  # act(x W_gate) * (x W_in)
        torch.testing.assert_close(gate, cache["post", layer], atol=1e-5, rtol=1e-5)


def test_weights_a_model_lacks_raise_config_errors():
    rotary = gqa_model()
    with pytest.raises(ms.ConfigError, match="W_pos"):
        _ = rotary.W_pos
    with pytest.raises(ms.ConfigError, match="W_in"):
        _ = mha_model().W_gate
    with pytest.raises(ms.ConfigError, match="attention-only"):
        _ = tiny_model(attn_only=True).W_in
    assert torch.equal(mha_model().W_pos, mha_model().pos_embed.W_pos)


def test_stacked_weights_keep_the_gradient_graph():
    model = mha_model()
    model.W_O.sum().backward()
    assert model.blocks[0].attn.w_o.grad is not None

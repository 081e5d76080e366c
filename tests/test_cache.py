"""ActivationCache: residual decompositions sum to the residual stream; norm scales apply exactly."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


@pytest.fixture
def run(small_model):
    logits, cache = small_model.run_with_cache(TOKENS)
    return small_model, logits, cache


def test_short_names_and_errors(run):
    model, _, cache = run
    assert cache["z", 1] is cache["blocks.1.attn.hook_z"]
    assert cache["scale", 2, "ln2"] is cache["blocks.2.ln2.hook_scale"]
    assert ("resid_pre", 0) in cache
    with pytest.raises(ms.HookNameError, match="was not cached"):
        cache["blocks.0.attn.hook_result"]
    with pytest.raises(ms.HookNameError, match="hook_resid_pre"):
        cache["blocks.0.hook_resid_pr"]
    assert ms.act_name("pattern", 4) == "blocks.4.attn.hook_pattern"


def test_accumulated_resid(run):
    model, _, cache = run
    stack, labels = cache.accumulated_resid(return_labels=True, incl_mid=True)
    assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]
    torch.testing.assert_close(stack[-1], cache["blocks.2.hook_resid_post"])
    torch.testing.assert_close(stack[3], cache["blocks.1.hook_resid_mid"])
    assert cache.accumulated_resid(layer=1).shape[0] == 2


def test_decompose_resid_sums_to_the_stream(run):
    model, _, cache = run
    for layer in range(model.cfg.n_layers + 1):
        stack = cache.decompose_resid(layer=layer)
        target = cache["resid_post", layer - 1] if layer == model.cfg.n_layers else cache["resid_pre", layer]
        torch.testing.assert_close(stack.sum(0), target, atol=1e-5, rtol=1e-5)
    stack, labels = cache.decompose_resid(layer=1, mlp_input=True, return_labels=True)
    torch.testing.assert_close(stack.sum(0), cache["resid_mid", 1], atol=1e-5, rtol=1e-5)
    assert labels[-1] == "1_attn_out"


def test_stack_head_results_with_remainder(run):
    model, _, cache = run
    stack, labels = cache.stack_head_results(layer=2, incl_remainder=True, return_labels=True)
    assert stack.shape[0] == 2 * model.cfg.n_heads + 1 and labels[0] == "L0H0"
    torch.testing.assert_close(stack.sum(0), cache["resid_pre", 2])
    # Without the remainder, heads of layer 0 plus the output bias give attn_out exactly.
    b_o = model.blocks[0].attn.b_o
    heads = cache.stack_head_results(layer=1).sum(0) + (0 if b_o is None else b_o)
    torch.testing.assert_close(heads, cache["attn_out", 0], atol=1e-5, rtol=1e-5)


def test_apply_ln_to_stack_reproduces_the_final_norm(run):
    model, logits, cache = run
    stack = cache.decompose_resid(apply_ln=True)
    ln = model.ln_final
    normalized = stack.sum(0) * ln.w + (ln.b if hasattr(ln, "b") else 0)
    torch.testing.assert_close(normalized, cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.unembed(normalized), logits, atol=1e-4, rtol=1e-4)


def test_pos_slice_selects_positions(run):
    model, _, cache = run
    last = cache.accumulated_resid(pos_slice=-1, apply_ln=True)
    full = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(last[:, :, 0], full[:, :, -1])


def test_remove_batch_dim_and_nbytes(small_model):
    _, cache = small_model.run_with_cache(TOKENS[:1])
    single = cache.remove_batch_dim()
    assert single["blocks.0.hook_resid_pre"].shape == (7, small_model.cfg.d_model)
    # resid_post of one block is the same tensor as resid_pre of the next: counted once.
    assert cache["blocks.0.hook_resid_post"].data_ptr() == cache["blocks.1.hook_resid_pre"].data_ptr()
    naive = sum(t.numel() * t.element_size() for t in cache.values())
    assert 0 < cache.nbytes() < naive


def test_attention_only_model_decomposes():
    from tests.conftest import tiny_model

    model = tiny_model(attn_only=True)
    assert not any("mlp" in name or "resid_mid" in name for name in model.hook_dict)
    _, cache = model.run_with_cache(TOKENS)
    stack, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "pos_embed", "0_attn_out", "1_attn_out", "2_attn_out"]
    torch.testing.assert_close(stack.sum(0), cache["resid_post", 2], atol=1e-5, rtol=1e-5)
    assert cache.accumulated_resid(incl_mid=True).shape[0] == 4

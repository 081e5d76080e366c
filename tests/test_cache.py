"""ActivationCache: residual decompositions sum to the residual stream; norm scales apply exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import mechscope as ms
from mechscope.model.processing import process_weights

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
    # hook_normalized is the norm's input centred and scaled, before its weight and bias.
    torch.testing.assert_close(stack.sum(0), cache["ln_final.hook_normalized"], atol=1e-5, rtol=1e-5)
    normalized = stack.sum(0) * ln.w + (ln.b if hasattr(ln, "b") else 0)
    torch.testing.assert_close(normalized, cache["unembed.hook_in"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.unembed(normalized), logits, atol=1e-4, rtol=1e-4)


def test_int_pos_slice_drops_the_position_axis(run):
    model, _, cache = run
    last = cache.accumulated_resid(pos_slice=-1, apply_ln=True)
    full = cache.accumulated_resid(apply_ln=True)
    assert last.shape == (4, 2, model.cfg.d_model)
    torch.testing.assert_close(last, full[:, :, -1])
    kept = cache.accumulated_resid(pos_slice=[-1], apply_ln=True)  # a list keeps the axis
    torch.testing.assert_close(kept[:, :, 0], last)
    for method in (cache.decompose_resid, cache.stack_head_results):
        sliced, whole = method(pos_slice=2, apply_ln=True), method(apply_ln=True)
        torch.testing.assert_close(sliced, whole[:, :, 2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(method(pos_slice=(1, 4)), method()[:, :, 1:4])
    stack = cache.decompose_resid(pos_slice=-1)
    torch.testing.assert_close(
        cache.apply_ln_to_stack(stack, pos_slice=-1), cache.apply_ln_to_stack(cache.decompose_resid())[:, :, -1]
    )


def test_logit_difference_recipe(small_model):
    """TransformerLens' recipe on a folded model: the decomposed stream at the last position,
    projected on the answer direction after the final norm's scale, sums to the logit difference
    (up to the unembedding bias, which no component writes)."""
    model = process_weights(copy.deepcopy(small_model), fold_ln=True)
    logits, cache = model.run_with_cache(TOKENS)
    right, wrong = torch.tensor([5, 7]), torch.tensor([9, 2])
    attrs = cache.logit_attrs(cache.decompose_resid(pos_slice=-1), right, wrong, pos_slice=-1)
    assert attrs.shape == (len(cache.decompose_resid()), 2)
    rows = torch.arange(2)
    direct = logits[rows, -1, right] - logits[rows, -1, wrong]
    b_u = model.b_U
    torch.testing.assert_close(attrs.sum(0) + b_u[right] - b_u[wrong], direct, atol=1e-4, rtol=1e-4)
    with pytest.raises(ms.InputError, match="same shape"):
        cache.logit_attrs(cache.decompose_resid(pos_slice=-1), right, torch.tensor([1, 2, 3]), pos_slice=-1)


def test_final_layer_logit_lens_recomputes_the_norm(run):
    model, logits, cache = run
    lens = cache.accumulated_resid(apply_ln=True)
    torch.testing.assert_close(model.unembed(lens[-1]), logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens[0], model.ln_final(cache["resid_pre", 0]))
    inner = cache.accumulated_resid(layer=2, apply_ln=True)  # elsewhere: the cached scale of ln1
    expected = cache.apply_ln_to_stack(cache.accumulated_resid(layer=2), layer=2)
    torch.testing.assert_close(inner, expected)


def test_tl_keys_and_negative_layers(run):
    model, _, cache = run
    assert cache["attn", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["k1"] is cache["blocks.1.attn.hook_k"]
    assert cache["scale2ln1"] is cache["blocks.2.ln1.hook_scale"]
    assert cache["embed"] is cache["hook_embed"]
    assert cache["resid_post", -1] is cache["blocks.2.hook_resid_post"]
    assert cache["z", -3, "attn"] is cache["blocks.0.attn.hook_z"]
    assert "k1" in cache and ("pattern", -1) in cache and "nonsense" not in cache


def test_remove_batch_dim_is_in_place(small_model):
    _, cache = small_model.run_with_cache(TOKENS[:1])
    entry = cache["resid_pre", 0]
    assert cache.remove_batch_dim() is cache and not cache.has_batch_dim
    torch.testing.assert_close(cache["resid_pre", 0], entry[0])
    assert cache.accumulated_resid(pos_slice=-1).shape == (4, small_model.cfg.d_model)
    with pytest.warns(UserWarning, match="already removed"):
        cache.remove_batch_dim()
    _, batch = small_model.run_with_cache(TOKENS)
    with pytest.raises(ms.InputError, match="batch size 2"):
        batch.remove_batch_dim()


def test_batch_slices_and_moves(run):
    model, _, cache = run
    first = cache.apply_slice_to_batch_dim(0)
    assert not first.has_batch_dim and first["resid_pre", 1].shape == (7, model.cfg.d_model)
    torch.testing.assert_close(first.decompose_resid(pos_slice=-1), cache.decompose_resid(pos_slice=-1)[:, 0])
    stack = cache.decompose_resid()
    torch.testing.assert_close(cache.apply_ln_to_stack(stack, batch_slice=[1]), cache.apply_ln_to_stack(stack)[:, [1]])
    assert cache.to("cpu") is cache
    assert cache.stack_activation("z").shape == (3, 2, 7, model.cfg.n_heads, model.cfg.d_head)
    assert cache.stack_activation("z", layer=2).shape[0] == 2


def test_head_results_are_computed_into_the_cache(run):
    model, _, cache = run
    assert "blocks.0.attn.hook_result" not in cache
    cache.compute_head_results()
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["result", layer], cache.head_results(layer))
    with pytest.warns(UserWarning, match="already cached"):
        cache.compute_head_results()


def test_neuron_decompositions(run):
    model, _, cache = run
    neurons = cache.get_neuron_results(1)
    b_out = model.b_out[1]
    torch.testing.assert_close(neurons.sum(-2) + b_out, cache["mlp_out", 1], atol=1e-5, rtol=1e-5)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cache.get_neuron_results(1, project_output_onto=direction), neurons @ direction)
    stack, labels = cache.stack_neuron_results(2, return_labels=True, incl_remainder=True)
    assert stack.shape[0] == 2 * model.cfg.d_mlp + 1 and labels[model.cfg.d_mlp] == "L1N0"
    torch.testing.assert_close(stack.sum(0), cache["resid_pre", 2], atol=1e-5, rtol=1e-5)
    sliced = cache.stack_neuron_results(2, pos_slice=-1, neuron_slice=(0, 5))
    assert sliced.shape == (10, 2, model.cfg.d_model)
    plain = cache.stack_neuron_results(2, pos_slice=-1, apply_ln=True) @ direction
    folded = cache.stack_neuron_results(2, pos_slice=-1, apply_ln=True, project_output_onto=direction)
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("expand_neurons", [True, False])
def test_full_resid_decomposition_sums_to_the_stream(run, expand_neurons):
    model, _, cache = run
    for layer, mlp_input, target in ((3, False, cache["resid_post", 2]), (1, True, cache["resid_mid", 1])):
        stack, labels = cache.get_full_resid_decomposition(
            layer, mlp_input, expand_neurons=expand_neurons, return_labels=True
        )
        assert len(labels) == stack.shape[0] and labels[-1] == "bias"
        torch.testing.assert_close(stack.sum(0), target, atol=1e-4, rtol=1e-4)
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    full = cache.get_full_resid_decomposition(expand_neurons=expand_neurons, apply_ln=True, pos_slice=-1)
    projected = cache.get_full_resid_decomposition(
        expand_neurons=expand_neurons, apply_ln=True, pos_slice=-1, project_output_onto=direction
    )
    torch.testing.assert_close(projected, full @ direction, atol=1e-4, rtol=1e-4)


def test_cache_sizes(small_model):
    _, cache = small_model.run_with_cache(TOKENS[:1])
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

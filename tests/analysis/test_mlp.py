"""MLP linearisation against autograd through the model's own forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.analysis import activation_derivative, linearise_mlp
from tests.conftest import tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5], [8, 9, 7, 9, 3, 2]])


def _autograd(model, layer, pos, batch, neuron=None, direction=None, freeze_norm=False):
    cfg = model.cfg
    input_name = f"blocks.{layer}.hook_resid_pre" if cfg.parallel_attn_mlp else f"blocks.{layer}.hook_resid_mid"
    store = {}

    def make_leaf(x, *, hook):
        store["x"] = x.detach().clone().requires_grad_(True)
        return store["x"]

    def grab(act, *, hook):
        store[hook.name] = act

    hooks = [(input_name, make_leaf), (f"blocks.{layer}.mlp.hook_post", grab), (f"blocks.{layer}.hook_mlp_out", grab)]
    if freeze_norm and cfg.normalization_type is not None:
        hooks.append((f"blocks.{layer}.ln2.hook_scale", lambda s, *, hook: s.detach()))
    model.run_with_hooks(TOKENS, fwd_hooks=hooks, stop_at_layer=layer + 1)
    if neuron is not None:
        target = store[f"blocks.{layer}.mlp.hook_post"][batch, pos, neuron]
    else:
        target = store[f"blocks.{layer}.hook_mlp_out"][batch, pos] @ direction
    target.backward()
    return store["x"].grad[batch, pos], target.item()


MODELS = {
    "layernorm_gelu_bias": dict(mlp_bias=True),
    "rmsnorm_gated_silu": dict(
        normalization_type="RMS", gated_mlp=True, act_fn="silu", positional_embedding_type="rotary"
    ),
    "layernorm_relu_parallel": dict(act_fn="relu", parallel_attn_mlp=True),
    "gated_gelu_exact": dict(gated_mlp=True, act_fn="gelu", normalization_type="RMS"),
    "no_norm": dict(normalization_type=None),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("freeze_norm", [False, True])
def test_linearisation_matches_autograd(name, freeze_norm):
    model = tiny_model(seed=7, **MODELS[name])
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    for layer, pos, batch, neuron in ((1, 4, 1, 7), (2, -1, 0, 30)):
        lin = linearise_mlp(model, TOKENS, layer, pos, neuron=neuron, batch=batch, freeze_norm=freeze_norm)
        grad, value = _autograd(model, layer, pos, batch, neuron=neuron, freeze_norm=freeze_norm)
        assert_close(lin.input_direction, grad, rtol=1e-4, atol=1e-6)
        assert lin.value == pytest.approx(value, rel=1e-5, abs=1e-6)
        lin = linearise_mlp(model, TOKENS, layer, pos, direction=direction, batch=batch, freeze_norm=freeze_norm)
        grad, value = _autograd(model, layer, pos, batch, direction=direction, freeze_norm=freeze_norm)
        assert_close(lin.input_direction, grad, rtol=1e-4, atol=1e-6)
        assert lin.value == pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("act_fn", ["relu", "silu", "gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_activation_derivatives(act_fn):
    x = torch.linspace(-4, 4, 101, dtype=torch.float64).requires_grad_(True)
    act = ms.model.components.activation_fn(act_fn)
    (grad,) = torch.autograd.grad(act(x).sum(), x)
    assert_close(activation_derivative(act_fn, x.detach()), grad)


def test_top_tokens_and_errors():
    model = tiny_model(seed=7)
    lin = linearise_mlp(model, TOKENS, 1, neuron=3)
    top = lin.top_tokens(model, k=4)
    expected = (model.W_E.detach() @ lin.input_direction).topk(4).indices.tolist()
    assert [int(t) for t, _ in top] == expected and lin.pos == 5
    with pytest.raises(ms.InputError, match="exactly one"):
        linearise_mlp(model, TOKENS, 1)
    with pytest.raises(ms.InputError, match="d_mlp=48"):
        linearise_mlp(model, TOKENS, 1, neuron=48)
    with pytest.raises(ms.InputError, match="out of range"):
        linearise_mlp(model, TOKENS, 3, neuron=1)
    with pytest.raises(ms.InputError, match=r"\[32\]"):
        linearise_mlp(model, TOKENS, 1, direction=torch.ones(5))
    with pytest.raises(ms.InputError, match="no derivative"):
        activation_derivative("tanh", torch.ones(2))

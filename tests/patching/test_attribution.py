"""AtP and AtP* against independent gradients and exact answers on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.names import act_name
from mechscope.patching import activation_patch, atp_star, attribution_patch
from mechscope.patching.atp_star import (
    _binomial_upper,
    graddrop_pass,
    head_names,
    qk_fix_components,
)
from mechscope.patching.attribution import gradient_pass
from tests.conftest import tiny_model
from tests.patching.oracle import cache_site
from tests.patching.test_activation import _pair, gpt2_model, gqa_model


def naive_grad(model, tokens, name, metric, drop_layer=None):
    """dM/d(activation) by adding a zero leaf at the hook point (one forward and backward per call)."""
    shape = cache_site_shape(model, tokens, name)
    delta = torch.zeros(shape, requires_grad=True)

    def add(act, *, hook):
        return act + delta

    def zero(grad, *, hook):
        return torch.zeros_like(grad)

    bwd = []
    if drop_layer is not None:
        bwd = [
            (n, zero)
            for n in (act_name("attn_out", drop_layer), act_name("mlp_out", drop_layer))
            if n in model.hook_dict
        ]
    logits = model.run_with_hooks(tokens, fwd_hooks=[(name, add)], bwd_hooks=bwd)
    (grad,) = torch.autograd.grad(metric(logits).sum(), delta)
    return grad


def cache_site_shape(model, tokens, name):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[name])
    return cache[name].shape


@pytest.mark.parametrize("make_model", [gqa_model, gpt2_model])
def test_gradients_and_graddrop_copies_match_naive(make_model):
    model = make_model()
    _, corrupted, metric = _pair(model)
    names = [act_name("z", 0), act_name("resid_pre", 1), act_name("post", 0)]
    acts, grads = gradient_pass(model, corrupted, names, metric, drop_layers=[None, 1, 0])
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupted, names_filter=names)
    for name in names:
        assert_close(acts[name], cache[name], atol=1e-6, rtol=0)
        assert_close(grads[name][0], naive_grad(model, corrupted, name, metric), atol=1e-5, rtol=1e-4)
        assert_close(grads[name][1], naive_grad(model, corrupted, name, metric, drop_layer=1), atol=1e-5, rtol=1e-4)
        assert_close(grads[name][2], naive_grad(model, corrupted, name, metric, drop_layer=0), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_atp_is_activation_difference_times_gradient(direction):
    model = gqa_model()
    clean, corrupted, metric = _pair(model, n=3)
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    sites = ["z", "resid_pre", "attn_out", "mlp_out", "post"]
    est = attribution_patch(model, clean, corrupted, metric, sites, direction=direction)
    reduce = {"z": (0, 1, 3), "resid_pre": (0, 2), "attn_out": (0, 2), "mlp_out": (0, 2), "post": (0, 1)}
    for site in sites:
        src, base_acts = cache_site(model, source, site), cache_site(model, base, site)
        for layer in range(model.cfg.n_layers):
            grad = naive_grad(model, base, act_name(site, layer), metric)
            expected = ((src[layer] - base_acts[layer]) * grad).sum(reduce[site]) / base.shape[0]
            assert_close(est[site][layer], expected, atol=1e-5, rtol=1e-4)


def test_atp_exact_where_the_metric_is_linear():
    """Without a final norm the logit difference is linear in the last layer's outputs."""
    model = tiny_model(n_layers=2, normalization_type=None)
    clean, corrupted, metric = _pair(model)
    est = attribution_patch(model, clean, corrupted, metric, ["mlp_out", "resid_post"])
    with torch.no_grad():
        base = metric(model(corrupted)).mean()
    for site in ("mlp_out", "resid_post"):
        exact = activation_patch(model, clean, corrupted, metric, site, layers=[1])[0] - base
        assert_close(est[site][1], exact, atol=1e-5, rtol=0)


def tiny_model_std(seed, std, **overrides):
    model = tiny_model(seed=seed, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(std / 0.2)
    return model


@pytest.mark.parametrize("positional", ["standard", "rotary"])
def test_qk_fix_components_are_exact_for_linear_attention(positional):
    model = tiny_model_std(
        4,
        0.6,
        n_layers=1,
        attn_only=True,
        normalization_type=None,
        n_key_value_heads=2,
        positional_embedding_type=positional,
    )
    clean, _, metric = _pair(model, n=2, seq=5)
    corrupted = clean.clone()
    corrupted[:, 1], corrupted[:, 4] = (clean[:, 1] + 7) % 61, (clean[:, 4] + 3) % 61  # the final query changes
    names = head_names(model, 0)
    acts, grads = gradient_pass(model, corrupted, names, metric)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names)
        base = metric(model(corrupted)).mean()
    query, key = qk_fix_components(model, 0, acts, {n: cache[n] for n in names}, grads[names[0]][0])
    exact_q = activation_patch(model, clean, corrupted, metric, "q")[0] - base  # [head]
    assert_close(query.mean(0), exact_q, atol=1e-5, rtol=1e-5)
    groups = model.cfg.n_kv_groups
    exact_k = activation_patch(model, clean, corrupted, metric, "k", by=("pos", "kv_head"))[0] - base  # [pos, kv]
    key_by_kv = key.mean(0).view(-1, groups, key.shape[-1]).sum(1).T  # [pos, kv_head]
    assert_close(key_by_kv, exact_k, atol=1e-5, rtol=1e-5)
    # The same through atp_star, whose value estimates are exact here too.
    for site in ("q", "v"):
        result = atp_star(model, clean, corrupted, metric, site=site, n_verify=0)
        exact = activation_patch(model, clean, corrupted, metric, site)[0] - base
        assert_close(result.estimates[0], exact, atol=1e-5, rtol=1e-5)
    # Plain AtP on the queries misses the softmax's curvature, so it is not exact here.
    grad_q = naive_grad(model, corrupted, act_name("q", 0), metric)
    q_src, q_base = cache_site(model, clean, "q")[0], cache_site(model, corrupted, "q")[0]
    plain_q = ((q_src - q_base) * grad_q).sum((0, 1, 3)) / 2
    assert (plain_q - exact_q).abs().max() > 1e-3


def test_atp_star_graddrop_verification_and_false_negatives():
    model = gqa_model()
    clean, corrupted, metric = _pair(model, n=2)
    result = atp_star(model, clean, corrupted, metric, top_k=2, n_verify=4, n_samples=3, seed=1)
    n_layers = model.cfg.n_layers
    # GradDrop scores from naive per-layer gradients: heads (AtP on z) and keys (QK fix).
    plain = atp_star(model, clean, corrupted, metric, site="z", n_verify=0)
    keys = atp_star(model, clean, corrupted, metric, site="k", n_verify=0)
    src, base_acts = cache_site(model, clean, "z"), cache_site(model, corrupted, "z")
    names = [head_names(model, layer) for layer in range(n_layers)]
    with torch.no_grad():
        _, src_cache = model.run_with_cache(clean, names_filter=[n for layer_names in names for n in layer_names])
        _, base_cache = model.run_with_cache(corrupted, names_filter=[n for layer_names in names for n in layer_names])
    expected = torch.zeros(n_layers, model.cfg.n_heads)
    expected_keys = torch.zeros(n_layers, model.cfg.n_key_value_heads)
    for drop in range(n_layers):
        for layer in range(n_layers):
            grad = naive_grad(model, corrupted, act_name("z", layer), metric, drop_layer=drop)
            expected[layer] += (((src[layer] - base_acts[layer]) * grad).sum((1, 3)).mean(0)).abs()
            _, key = qk_fix_components(model, layer, base_cache.cache_dict, src_cache.cache_dict, grad)
            expected_keys[layer] += key.sum(-1).mean(0).view(-1, model.cfg.n_kv_groups).sum(-1).abs()
    assert_close(plain.graddrop, expected / (n_layers - 1), atol=1e-5, rtol=1e-4)
    assert_close(keys.graddrop, expected_keys / (n_layers - 1), atol=1e-5, rtol=1e-4)
    assert_close(plain.estimates, plain.atp)
    # Candidates in GradDrop order, verified exactly; the top-k are the largest verified effects.
    order = result.scores.flatten().argsort(descending=True)[:4]
    assert result.candidates.tolist() == [[int(i) // 4, int(i) % 4] for i in order]
    with torch.no_grad():
        base = metric(model(corrupted)).mean()
    grid = activation_patch(model, clean, corrupted, metric, "z") - base
    assert_close(result.verified, grid[result.candidates[:, 0], result.candidates[:, 1]], atol=1e-5, rtol=0)
    best = result.verified.abs().argsort(descending=True)[:2]
    assert result.top.tolist() == result.candidates[best].tolist()
    fn = result.false_negatives
    assert fn.sampled == 3 and 0 <= fn.found <= 3 and fn.upper_bound >= fn.estimate >= 0
    assert fn.threshold == pytest.approx(float(result.verified[best].abs().min()))


def test_atp_star_neurons_and_errors():
    model = gpt2_model()
    clean, corrupted, metric = _pair(model)
    result = atp_star(model, clean, corrupted, metric, site="post", top_k=4, graddrop=False)
    assert result.estimates.shape == (2, 8) and result.graddrop is None
    with torch.no_grad():
        base = metric(model(corrupted)).mean()
    exact = activation_patch(model, clean, corrupted, metric, "post", patches=result.candidates) - base
    assert_close(result.verified, exact, atol=1e-5, rtol=0)
    with pytest.raises(ms.InputError, match="site"):
        atp_star(model, clean, corrupted, metric, site="mlp_out")
    with pytest.raises(ms.InputError, match="threshold"):
        atp_star(model, clean, corrupted, metric, n_verify=0, n_samples=2)


def test_binomial_upper_bound():
    assert _binomial_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10), abs=1e-9)
    assert _binomial_upper(10, 10, 0.05) == 1.0
    assert 0.3 < _binomial_upper(2, 10, 0.05) < 0.6


THREE_LAYERS = {
    "gqa": {
        "seed": 1,
        "d_mlp": 8,
        "n_key_value_heads": 2,
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "gated_mlp": True,
        "act_fn": "silu",
    },
    "gpt2": {"d_mlp": 8, "attn_qkv_bias": True, "attn_out_bias": True, "mlp_bias": True},
}


@pytest.mark.parametrize("kind", list(THREE_LAYERS))
@pytest.mark.parametrize("padded", [False, True])
def test_graddrop_pass_equals_batched_copies(kind, padded):
    """One forward and partial backwards give the gradients of one backward per dropped layer."""
    model = tiny_model(**THREE_LAYERS[kind])
    _, corrupted, metric = _pair(model, n=2)
    mask = None
    if padded:
        mask = torch.ones_like(corrupted)
        mask[1, :1] = 0
    names = [n for layer in range(3) for n in head_names(model, layer)] + [
        act_name("post", layer) for layer in range(3)
    ]
    acts, grads = graddrop_pass(model, corrupted, names, metric, mask)
    ref_acts, ref_grads = gradient_pass(model, corrupted, names, metric, [None, 0, 1, 2], mask)
    for name in names:
        assert_close(acts[name], ref_acts[name], atol=1e-6, rtol=0)
        assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(ms.InputError, match="attention and MLP nodes"):
        graddrop_pass(model, corrupted, ["blocks.0.hook_resid_pre"], metric)

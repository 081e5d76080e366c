"""Path patching against a direct, slow implementation and an analytic answer."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.names import act_name
from mechscope.patching import path_patch
from tests.conftest import tiny_model
from tests.patching.test_activation import _pair, gqa_model


def slow_path_patch(model, clean, corrupted, metric, senders, receivers, which, freeze_mlps=False):
    """One sender set: full forwards with simple hooks, no batching, no starting mid-model."""
    n_layers = model.cfg.n_layers
    names = [act_name("z", layer) for layer in range(n_layers)] + [
        act_name("mlp_out", layer) for layer in range(n_layers)
    ]
    names = [name for name in names if name in model.hook_dict]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=names)
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=names)
    hooks = []
    for layer in range(n_layers):

        def freeze(z, *, hook, layer=layer):
            z = clean_cache["z", layer].clone()
            for sl, sh in senders:
                if sl == layer:
                    z[:, :, sh] = corrupted_cache["z", layer][:, :, sh]
            return z

        hooks.append((act_name("z", layer), freeze))
        if freeze_mlps:
            hooks.append((act_name("mlp_out", layer), lambda x, *, hook, layer=layer: clean_cache["mlp_out", layer]))
    store = {}

    def keep(x, *, hook):
        store[hook.name] = x.clone()

    hooks += [(act_name("resid_pre", layer), keep) for layer in range(n_layers)]
    with torch.no_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=hooks)
    if receivers == "logits":
        return metric(logits).mean()
    swaps = []
    for layer, head in receivers:

        def swap(x, *, hook, layer=layer, head=head):
            x = x.clone()
            x[:, :, head] = store[act_name("resid_pre", layer)]
            return x

        swaps.append((f"blocks.{layer}.hook_{which}_input", swap))
    with torch.no_grad():
        return metric(model.run_with_hooks(clean, fwd_hooks=swaps)).mean()


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_receivers_heads_match_slow(kv_heads, which):
    model = tiny_model(seed=5, n_layers=3, d_mlp=8, n_key_value_heads=kv_heads)
    clean, corrupted, metric = _pair(model)
    receivers = [(2, 1), (1, 0)]  # key/value receivers are key-value heads
    senders = [[(0, 1)], [(0, 2), (1, 3)], [(1, 2)], [(2, 0)]]
    got = path_patch(model, clean, corrupted, metric, senders, receivers, which, batch_size=4)
    expected = torch.stack([slow_path_patch(model, clean, corrupted, metric, s, receivers, which) for s in senders])
    assert_close(got, expected, atol=1e-5, rtol=0)
    # A sender after every receiver has no path to them: the clean metric.
    with torch.no_grad():
        assert_close(got[3], metric(model(clean)).mean(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_logits_sweep_matches_slow(freeze_mlps):
    model = gqa_model()
    clean, corrupted, metric = _pair(model)
    got = path_patch(model, clean, corrupted, metric, freeze_mlps=freeze_mlps, batch_size=6)
    assert got.shape == (2, 4)
    for layer in range(2):
        for head in range(4):
            expected = slow_path_patch(model, clean, corrupted, metric, [(layer, head)], "logits", None, freeze_mlps)
            assert_close(got[layer, head], expected, atol=1e-5, rtol=0)


def test_direct_path_to_logits_is_analytic():
    """Attention-only, no norms: the path from a head to the logits is (z_corr - z_clean) W_O W_U."""
    model = tiny_model(seed=6, n_layers=2, attn_only=True, normalization_type=None)
    clean, corrupted, metric = _pair(model)
    got = path_patch(model, clean, corrupted, metric, per_prompt=True)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
        _, corr = model.run_with_cache(corrupted, names_filter=lambda n: n.endswith("hook_z"))
        for layer in range(2):
            W_O = model.blocks[layer].attn.W_O  # [head, d_head, d_model]
            for head in range(4):
                delta = (corr["z", layer][:, :, head] - cache["z", layer][:, :, head]) @ W_O[head] @ model.W_U
                assert_close(got[layer, head], metric(clean_logits + delta), atol=1e-5, rtol=0)


def test_path_patching_errors():
    model = gqa_model()
    clean, corrupted, metric = _pair(model)
    with pytest.raises(ms.InputError, match="out of range"):
        path_patch(model, clean, corrupted, metric, [[(0, 4)]])
    with pytest.raises(ms.InputError, match="out of range"):
        path_patch(model, clean, corrupted, metric, [[(0, 1)]], [(1, 3)], "k")  # 2 key-value heads
    with pytest.raises(ms.InputError, match="receiver_input"):
        path_patch(model, clean, corrupted, metric, receivers=[(1, 0)], receiver_input="z")
    with pytest.raises(ms.InputError, match="receivers"):
        path_patch(model, clean, corrupted, metric, receivers="resid")

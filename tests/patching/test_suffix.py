"""The position-suffix path of the patching engine against the one-forward-per-patch oracle.

A patch at position ``p`` runs positions ``p:`` only, attending to the base run's keys and
values before ``p``; these tests compare it with full forwards on models with learned and
rotary positions, multi-head and grouped-query attention, sliding-window layers and
left-padded batches.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.patching import activation_patch
from tests.conftest import tiny_model
from tests.patching.oracle import cache_site, naive_patch_grid
from tests.patching.test_activation import _pair


def mha_learned():
    """LayerNorm, learned positions, biases, multi-head attention."""
    return tiny_model(n_layers=2, d_mlp=8, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True)


def gqa_rotary():
    """RMSNorm, rotary, gated MLP, grouped-query attention (4 heads, 2 kv heads)."""
    return tiny_model(
        seed=1,
        n_layers=2,
        d_mlp=8,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
    )


def sliding():
    """A sliding-window layer (window 2) then a full-attention layer, rotary, GQA."""
    return tiny_model(
        seed=2,
        n_layers=2,
        d_mlp=8,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        sliding_window=2,
        layer_types=["sliding_attention", "full_attention"],
    )


def every_position(logits):
    """Reads the logits at every position, so prefix logits must be right too."""
    return logits[..., :7].sum((-1, -2))


MODELS = [mha_learned, gqa_rotary, sliding]
CASES = [
    (m, d, s, b)
    for m in MODELS
    for d in ("denoising", "noising")
    for s, b in [("resid_pre", None), ("z", ("pos", "head"))]
]
CASES += [
    (mha_learned, "denoising", s, b)
    for s, b in [
        ("attn_out", None),
        ("mlp_out", None),
        ("q", ("pos", "head")),
        ("result", ("pos", "head")),
        ("k", ("pos", "kv_head")),
        ("v", ("pos", "kv_head")),
    ]
]
CASES += [(gqa_rotary, "noising", s, b) for s, b in [("k", ("pos", "kv_head")), ("attn_out", None)]]


def _check(model, clean, corrupted, metric, site, by, direction, mask=None, **kw):
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    sources = cache_site(model, source, site, attention_mask=mask)
    expected = naive_patch_grid(model, base, sources, metric, site, by, attention_mask=mask)
    got = activation_patch(model, clean, corrupted, metric, site, by, direction=direction, attention_mask=mask, **kw)
    assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "make_model,direction,site,by", CASES, ids=[f"{m.__name__}-{d}-{s}-{b}" for m, d, s, b in CASES]
)
def test_suffix_equals_naive(make_model, direction, site, by):
    model = make_model()
    clean, corrupted, metric = _pair(model, seq=5)
    # A small batch mixes layers and start positions inside one forward.
    _check(model, clean, corrupted, metric, site, by, direction, batch_size=7)


@pytest.mark.parametrize("make_model", MODELS)
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_left_padded_batch_with_mask(make_model, direction):
    model = make_model()
    clean, corrupted, metric = _pair(model, n=3, seq=6, seed=4)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :1] = 0
    _check(model, clean, corrupted, metric, "resid_pre", None, direction, mask=mask, batch_size=9)
    _check(model, clean, corrupted, metric, "z", ("pos", "head"), direction, mask=mask, batch_size=9)


@pytest.mark.parametrize("logit_positions", [None, [1, -1], -1])
def test_metric_sees_prefix_logits(logit_positions):
    """Metrics reading positions before the patch see the base run's logits there."""
    model = gqa_rotary()
    clean, corrupted, _ = _pair(model, n=2, seq=5, seed=2)
    keep = [logit_positions] if isinstance(logit_positions, int) else logit_positions

    def on_kept(logits):
        return every_position(logits if keep is None else logits[:, keep])

    reference = naive_patch_grid(model, corrupted, cache_site(model, clean, "resid_post"), on_kept, "resid_post", None)
    got = activation_patch(
        model, clean, corrupted, every_position, "resid_post", batch_size=4, logit_positions=logit_positions
    )
    assert_close(got, reference, atol=1e-5, rtol=0)


def test_suffix_runs_fewer_positions():
    """Forwards of patches at later positions run only the positions from there on."""
    model = gqa_rotary()
    clean, corrupted, metric = _pair(model, n=2, seq=5)
    results, lengths = {}, {}
    for reuse in (True, False):
        seen = lengths[reuse] = []
        handles = model.add_hook("blocks.1.hook_resid_post", lambda x, *, hook, seen=seen: seen.append(x.shape[1]))
        try:
            results[reuse] = activation_patch(
                model, clean, corrupted, metric, "resid_pre", batch_size=2, reuse_prefix=reuse
            )
        finally:
            for handle in handles:
                handle.remove()
    assert_close(results[True], results[False], atol=1e-5, rtol=0)
    assert set(lengths[False]) == {5}
    assert min(lengths[True][1:]) == 1 and max(lengths[True][1:]) == 5  # lengths[True][0] is the base run
    assert sum(lengths[True]) < sum(lengths[False]) and len(lengths[True]) == len(lengths[False])

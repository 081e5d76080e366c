"""Batched activation patching and ablation against the one-forward-per-patch oracle."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.patching import ablate, activation_patch
from mechscope.patching.metrics import KLDivergence, LogitDiff, Normalized, ProbDiff
from tests.conftest import tiny_model
from tests.patching.oracle import cache_site, naive_patch_grid

SITES_BY = [
    ("resid_pre", None),
    ("resid_mid", None),
    ("resid_post", None),
    ("attn_out", None),
    ("mlp_out", None),
    ("z", None),
    ("z", ("pos", "head")),
    ("result", None),
    ("q", None),
    ("k", None),
    ("v", None),
    ("pattern", None),
    ("post", None),
    ("resid_pre", ()),
]


def _pair(model, seed=0, n=2, seq=4):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(model.cfg.d_vocab, (n, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(model.cfg.d_vocab, (n,), generator=gen)
    corrupted[:, 3] = torch.randint(model.cfg.d_vocab, (n,), generator=gen)
    answers = torch.randint(model.cfg.d_vocab, (n, 2), generator=gen)
    return clean, corrupted, LogitDiff(answers[:, 0], answers[:, 1])


def gqa_model():
    """Two layers, RMSNorm, rotary, gated MLP and grouped-query attention (4 heads, 2 kv heads)."""
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


def gpt2_model():
    return tiny_model(n_layers=2, d_mlp=8, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True)


# Every site in both directions on the grouped-query model; the biased LayerNorm model on a few.
CASES = [(gqa_model, d, site, by) for d in ("denoising", "noising") for site, by in SITES_BY]
CASES += [(gpt2_model, "denoising", site, None) for site in ("resid_mid", "z", "result", "post")]


@pytest.mark.parametrize(
    "make_model,direction,site,by", CASES, ids=[f"{m.__name__[:-6]}-{d}-{s}-{b}" for m, d, s, b in CASES]
)
def test_batched_equals_naive(make_model, direction, site, by):
    model = make_model()
    clean, corrupted, metric = _pair(model)
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    expected = naive_patch_grid(model, base, cache_site(model, source, site), metric, site, by)
    # A small batch size makes chunks that mix layers, so later layers start mid-chunk.
    got = activation_patch(model, clean, corrupted, metric, site, by, direction=direction, batch_size=7)
    assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kind,site,by",
    [(kind, site, None) for kind in ("zero", "mean", "resample") for site in ("resid_post", "k")]
    + [("mean", "post", None)],
)
def test_ablation_equals_naive(kind, site, by):
    model = gqa_model()
    tokens, reference, metric = _pair(model, seed=3, n=3)
    reference = torch.randint(model.cfg.d_vocab, (4, tokens.shape[1]), generator=torch.Generator().manual_seed(9))
    ref_acts = cache_site(model, reference, site)
    base_acts = cache_site(model, tokens, site)
    if kind == "zero":
        sources = {layer: torch.zeros_like(act) for layer, act in base_acts.items()}
    elif kind == "mean":
        sources = {layer: act.mean(0, keepdim=True) for layer, act in ref_acts.items()}
    else:
        pick = torch.randint(4, (3,), generator=torch.Generator().manual_seed(5))
        sources = {layer: act[pick] for layer, act in ref_acts.items()}
    expected = naive_patch_grid(model, tokens, sources, metric, site, by)
    got = ablate(model, tokens, metric, site, by, kind=kind, reference=reference, seed=5, batch_size=10)
    assert_close(got, expected, atol=1e-5, rtol=0)


def test_zero_ablation_of_whole_attention_layer_matches_manual():
    model = tiny_model(seed=2)
    tokens = torch.randint(model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    metric = LogitDiff([1, 2], [3, 4])

    def zero(act, *, hook):
        return torch.zeros_like(act)

    with torch.no_grad():
        expected = metric(model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_attn_out", zero)])).mean()
    got = ablate(model, tokens, metric, "attn_out", by=(), kind="zero")
    assert_close(got[1], expected, atol=1e-5, rtol=0)


def test_final_position_logits_only():
    model = gqa_model()
    clean, corrupted, metric = _pair(model, n=3)
    full = activation_patch(model, clean, corrupted, metric, "resid_post", batch_size=9)
    last = activation_patch(model, clean, corrupted, metric, "resid_post", logit_positions=-1)
    assert_close(last, full, atol=1e-5, rtol=0)


def test_explicit_patch_list_and_per_prompt(small_model):
    model = small_model
    clean, corrupted, metric = _pair(model, n=3)
    grid = activation_patch(model, clean, corrupted, metric, "z", per_prompt=True)
    assert grid.shape == (3, 4, 3)
    picked = activation_patch(model, clean, corrupted, metric, "z", patches=[[2, 1], [0, 3]], per_prompt=True)
    assert_close(picked, torch.stack([grid[2, 1], grid[0, 3]]), atol=1e-5, rtol=0)


def test_patching_full_layer_recovers_clean_metric(small_model):
    """Denoising the whole residual stream at layer 0 reproduces the clean run exactly."""
    model = small_model
    clean, corrupted, metric = _pair(model)
    got = activation_patch(model, clean, corrupted, metric, "resid_pre", by=())
    with torch.no_grad():
        assert_close(got[0], metric(model(clean)).mean(), atol=1e-5, rtol=0)


def test_metrics_against_definitions():
    gen = torch.Generator().manual_seed(0)
    logits, clean = torch.randn(4, 3, 9, generator=gen), torch.randn(2, 3, 9, generator=gen)
    final = logits[:, -1]
    ld = LogitDiff([1, 2], [3, 4])(logits)
    assert_close(ld, final[[0, 1, 2, 3], [1, 2, 1, 2]] - final[[0, 1, 2, 3], [3, 4, 3, 4]])
    sets = LogitDiff([[1, 5], [2, -1]], [3, 4])(logits)
    assert_close(sets[0], (final[0, 1] + final[0, 5]) / 2 - final[0, 3])
    probs = final.softmax(-1)
    assert_close(ProbDiff([[1, 5], [2, -1]], [3, 4])(logits)[2], probs[2, 1] + probs[2, 5] - probs[2, 3])
    kl = KLDivergence(clean)(logits)
    p = clean[:, -1].softmax(-1).repeat(2, 1)
    assert_close(kl, (p * (p.log() - final.log_softmax(-1))).sum(-1))
    corrupted = torch.randn(2, 3, 9, generator=gen)
    norm = Normalized(LogitDiff([1, 2], [3, 4]), clean, corrupted)
    assert_close(norm(clean).mean(), torch.tensor(1.0))
    assert_close(norm(corrupted).mean(), torch.tensor(0.0), atol=1e-6, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = gqa_model()
    clean, corrupted, metric = _pair(model)
    with pytest.raises(ms.HookNameError, match="resid_pre"):
        activation_patch(model, clean, corrupted, metric, "resid_pr")
    with pytest.raises(ms.InputError, match="choose axes among"):
        activation_patch(model, clean, corrupted, metric, "z", by="d_model")
    with pytest.raises(ms.InputError, match="differ in shape"):
        activation_patch(model, clean, corrupted[:, :3], metric)
    with pytest.raises(ms.InputError, match="direction"):
        activation_patch(model, clean, corrupted, metric, direction="forwards")
    with pytest.raises(ms.InputError, match="multiple"):
        activation_patch(model, clean, corrupted, LogitDiff([1, 2, 3], [4, 5, 6]), patches=[[0, 1]])
    with pytest.raises(ms.InputError, match="out of range"):
        activation_patch(model, clean, corrupted, metric, "z", patches=[[0, 9]])
    with pytest.raises(ms.InputError, match="equal length"):
        ablate(model, clean, metric, kind="mean", reference=clean[:, :3])
    attn_only = tiny_model(attn_only=True)
    with pytest.raises(ms.HookNameError, match="hook_resid_mid"):
        activation_patch(attn_only, clean, corrupted, metric, "resid_mid")


def test_left_padded_prompts_with_attention_mask():
    model = gqa_model()
    clean, corrupted, metric = _pair(model, n=2, seq=5)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # the second prompt is left-padded by two tokens
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"), attention_mask=mask)
    sources = {layer: cache["z", layer] for layer in range(2)}
    expected = torch.empty(2, 4)
    for layer in range(2):
        for head in range(4):

            def hook(z, *, hook, layer=layer, head=head):
                z = z.clone()
                z[:, :, head] = sources[layer][:, :, head]
                return z

            with torch.no_grad():
                logits = model.run_with_hooks(
                    corrupted, attention_mask=mask, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]
                )
            expected[layer, head] = metric(logits).mean()
    got = activation_patch(model, clean, corrupted, metric, "z", attention_mask=mask, batch_size=6)
    assert_close(got, expected, atol=1e-5, rtol=0)

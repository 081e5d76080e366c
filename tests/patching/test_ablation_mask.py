"""Zero, mean and resample ablation of padded prompts against naive per-patch forwards."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.patching import ablate
from tests.patching.oracle import cache_site, naive_patch_grid
from tests.patching.test_suffix import _pair, gqa_rotary, mha_learned


def _masks():
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    mask[2, :1] = 0
    ref_mask = torch.ones(4, 6, dtype=torch.long)
    ref_mask[0, :1] = 0
    ref_mask[2, :2] = 0
    ref_mask[3, :3] = 0
    return mask, ref_mask


def naive_masked_mean(acts, ref_mask):
    """Mean over the reference rows that hold a real token, position by position."""
    out = {}
    for layer, act in acts.items():
        mean = torch.zeros_like(act[:1])
        for t in range(act.shape[1]):
            rows = [j for j in range(act.shape[0]) if ref_mask[j, t]]
            mean[0, t] = act[rows, t].mean(0)
        out[layer] = mean
    return out


CASES = [(gqa_rotary, site) for site in ("resid_post", "post")] + [(mha_learned, "z")]


@pytest.mark.parametrize("kind", ["zero", "mean", "resample"])
@pytest.mark.parametrize("make_model,site", CASES, ids=[f"{m.__name__}-{s}" for m, s in CASES])
def test_padded_ablation_equals_naive(make_model, kind, site):
    by = None
    model = make_model()
    tokens, _, metric = _pair(model, n=3, seq=6, seed=6)
    reference = torch.randint(model.cfg.d_vocab, (4, 6), generator=torch.Generator().manual_seed(8))
    mask, ref_mask = _masks()
    ref_acts = cache_site(model, reference, site, attention_mask=ref_mask)
    if kind == "zero":
        sources = {layer: torch.zeros_like(act[:1]) for layer, act in ref_acts.items()}
    elif kind == "mean":
        sources = naive_masked_mean(ref_acts, ref_mask)
    else:
        ref_mask[1] = mask[0]  # each prompt is padded like exactly one reference prompt
        ref_mask[2] = mask[1]
        ref_mask[3] = mask[2]
        ref_mask[0, :4] = 0
        ref_acts = cache_site(model, reference, site, attention_mask=ref_mask)
        sources = {layer: act[[1, 2, 3]] for layer, act in ref_acts.items()}
    expected = naive_patch_grid(model, tokens, sources, metric, site, by, attention_mask=mask)
    got = ablate(
        model,
        tokens,
        metric,
        site,
        by,
        kind=kind,
        reference=reference,
        attention_mask=mask,
        reference_mask=ref_mask,
        batch_size=8,
    )
    assert_close(got, expected, atol=1e-5, rtol=0)


def test_mean_ignores_padding_of_the_ablated_prompts_by_default():
    """Without a reference the prompts are their own reference, padding left out of the mean."""
    model = gqa_rotary()
    tokens, _, metric = _pair(model, n=3, seq=6, seed=6)
    mask, _ = _masks()
    sources = naive_masked_mean(cache_site(model, tokens, "resid_pre", attention_mask=mask), mask)
    expected = naive_patch_grid(model, tokens, sources, metric, "resid_pre", None, attention_mask=mask)
    got = ablate(model, tokens, metric, "resid_pre", kind="mean", attention_mask=mask)
    assert_close(got, expected, atol=1e-5, rtol=0)


def test_padded_ablation_errors():
    model = gqa_rotary()
    tokens, _, metric = _pair(model, n=3, seq=6)
    mask, _ = _masks()
    reference = tokens[:2]
    with pytest.raises(ms.InputError, match="positions \\[0\\]"):
        ablate(
            model, tokens, metric, kind="mean", reference=reference, reference_mask=torch.tensor([[0] + [1] * 5] * 2)
        )
    with pytest.raises(ms.InputError, match="padded like prompt 1"):
        ablate(
            model,
            tokens,
            metric,
            kind="resample",
            attention_mask=mask,
            reference=reference,
            reference_mask=torch.ones(2, 6),
        )
    with pytest.raises(ms.InputError, match="attention_mask has shape"):
        ablate(model, tokens, metric, kind="mean", reference=reference, reference_mask=torch.ones(3, 6))

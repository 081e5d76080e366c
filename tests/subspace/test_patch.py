"""Batched subspace patching against a naive hook: one forward per (layer, index, subspace)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import InputError
from mechscope.names import SITES
from mechscope.patching.metrics import LogitDiff
from mechscope.subspace import as_bases, subspace_hooks, subspace_patch
from tests.conftest import tiny_model


def gqa_model():
    return tiny_model(
        seed=1, n_layers=2, d_mlp=8, n_key_value_heads=2, normalization_type="RMS",
        positional_embedding_type="rotary", gated_mlp=True, act_fn="silu",
    )  # fmt: skip


def gpt2_model():
    return tiny_model(n_layers=2, d_mlp=8, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True)


def pair(model, seed=0, n=2, seq=5):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(model.cfg.d_vocab, (n, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(model.cfg.d_vocab, (n,), generator=gen)
    corrupted[:, 3] = torch.randint(model.cfg.d_vocab, (n,), generator=gen)
    answers = torch.randint(model.cfg.d_vocab, (n, 2), generator=gen)
    return clean, corrupted, LogitDiff(answers[:, 0], answers[:, 1])


def naive(model, base, src, bases, metric, site, by, layer, index, k):
    """Patch subspace ``k`` at ``index`` (one entry per ``by`` axis) with a plain hook on the site,
    from the source activation ``src``."""
    name = SITES[site].hook(layer)
    basis = bases[k]
    axes = SITES[site].axes[:-1]

    def hook(x, *, hook):
        sel = [slice(None)] + [index[by.index(a)] if a in by else slice(None) for a in axes]
        out = x.clone()
        part, s = x[tuple(sel)], src[tuple(sel)]
        out[tuple(sel)] = part + ((s - part) @ basis) @ basis.T
        return out

    return metric(model.run_with_hooks(base, fwd_hooks=[(name, hook)]))


def random_bases(d_act, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # a direction, a plane and a 3-d subspace: padded to d_sub = 3
    return as_bases([torch.randn(d_act, generator=gen), torch.randn(d_act, 2, generator=gen),
                     torch.randn(d_act, 3, generator=gen)])  # fmt: skip


CASES = [
    (gqa_model, "resid_pre", ("pos",), "denoising"),
    (gqa_model, "resid_post", ("pos",), "noising"),
    (gqa_model, "post", ("pos",), "denoising"),
    (gqa_model, "z", ("head",), "denoising"),
    (gpt2_model, "z", ("pos", "head"), "noising"),
    (gqa_model, "v", ("kv_head",), "noising"),
    (gqa_model, "resid_mid", (), "denoising"),
    (gpt2_model, "mlp_out", ("pos",), "denoising"),
    (gpt2_model, "post", ("pos",), "noising"),
]


@pytest.mark.parametrize("make, site, by, direction", CASES)
def test_subspace_patch_matches_naive_hook(make, site, by, direction):
    model = make()
    clean, corrupted, metric = pair(model)
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    name = SITES[site].hook(0)
    d_act = model.run_with_cache(clean, names_filter=[name])[1][name].shape[-1]
    bases = random_bases(d_act)
    got = subspace_patch(model, clean, corrupted, bases, metric, site, by, direction=direction, per_prompt=True)
    sizes = got.shape[1:-2]
    assert got.shape == (model.cfg.n_layers, *sizes, 3, clean.shape[0])
    _, cache = model.run_with_cache(source)
    for layer, *index, k in itertools.product(range(model.cfg.n_layers), *map(range, sizes), range(3)):
        want = naive(model, base, cache[SITES[site].hook(layer)], bases, metric, site, by, layer, index, k)
        assert_close(got[(layer, *index, k)], want, atol=2e-5, rtol=1e-5)


def test_chunking_and_prefix_reuse_give_the_same_result():
    model = gpt2_model()
    clean, corrupted, metric = pair(model, seed=3)
    bases = random_bases(model.cfg.d_model, seed=3)
    full = subspace_patch(model, clean, corrupted, bases, metric, "resid_pre", per_prompt=True, reuse_prefix=False)
    small = subspace_patch(model, clean, corrupted, bases, metric, "resid_pre", per_prompt=True, batch_size=4)
    assert_close(small, full, atol=2e-5, rtol=1e-5)


def test_positions_and_explicit_patches_pick_grid_entries():
    model = gqa_model()
    clean, corrupted, metric = pair(model, seed=1)
    bases = random_bases(model.cfg.d_model, seed=1)
    grid = subspace_patch(model, clean, corrupted, bases, metric, "resid_pre")
    some = subspace_patch(model, clean, corrupted, bases, metric, "resid_pre", positions=[3, -1])
    assert_close(some, grid[:, [3, 4]], atol=2e-5, rtol=1e-5)
    picked = subspace_patch(model, clean, corrupted, bases, metric, "resid_pre", patches=[[1, 2, 0], [0, 4, 2]])
    assert_close(picked, torch.stack([grid[1, 2, 0], grid[0, 4, 2]]), atol=2e-5, rtol=1e-5)


def test_per_layer_directions():
    model = gqa_model()
    clean, corrupted, metric = pair(model, seed=2)
    per_layer = {0: random_bases(model.cfg.d_model, seed=4), 1: random_bases(model.cfg.d_model, seed=5)}
    got = subspace_patch(model, clean, corrupted, per_layer, metric, "resid_pre")
    for layer in (0, 1):
        alone = subspace_patch(model, clean, corrupted, per_layer[layer], metric, "resid_pre", layers=[layer])
        assert_close(got[layer], alone[0], atol=2e-5, rtol=1e-5)


def test_full_basis_equals_activation_patching_and_self_patch_changes_nothing():
    model = gpt2_model()
    clean, corrupted, metric = pair(model, seed=5)
    full = subspace_patch(model, clean, corrupted, torch.eye(model.cfg.d_model)[None], metric, "resid_pre")
    from mechscope.patching import activation_patch

    assert_close(full[..., 0], activation_patch(model, clean, corrupted, metric, "resid_pre"), atol=2e-5, rtol=1e-5)
    # patching a prompt with itself changes nothing (to float rounding of the suffix forwards)
    same = subspace_patch(model, clean, clean, random_bases(model.cfg.d_model), metric, "resid_pre", per_prompt=True)
    plain = metric(model(clean)).detach()
    assert_close(same, plain.expand_as(same), atol=1e-5, rtol=1e-5)


def test_coordinate_hooks_leave_unchanged_coordinates_exact():
    model = gqa_model()
    clean = pair(model)[0]
    bases = {"blocks.1.hook_resid_pre": random_bases(model.cfg.d_model)}
    with subspace_hooks(model, bases, [("blocks.1.hook_resid_pre.hook_subspace", lambda c, *, hook: c.clone())]):
        hooked = model(clean)
    assert torch.equal(hooked, model(clean))


def test_errors_name_the_fix():
    model = gqa_model()
    clean, corrupted, metric = pair(model)
    with pytest.raises(InputError, match="last axis 'd_model'"):
        subspace_patch(model, clean, corrupted, torch.randn(32), metric, "resid_pre", by=("pos", "d_model"))
    with pytest.raises(InputError, match="d_act=32"):
        subspace_patch(model, clean, corrupted, torch.randn(7), metric, "resid_pre")
    with pytest.raises(InputError, match="linearly dependent"):
        subspace_patch(model, clean, corrupted, torch.ones(1, 32, 2), metric, "resid_pre")
    with pytest.raises(InputError, match="no directions for layers"):
        subspace_patch(model, clean, corrupted, {0: torch.randn(32)}, metric, "resid_pre", layers=[0, 1])

"""The sparse TopK/BatchTopK training kernels against the dense formulation (autograd)."""

from __future__ import annotations

import pytest
import torch

from mechscope.sae import SAEConfig, make_sae, registered_architectures, sae_class
from mechscope.sae.architectures.sparse_ops import (
    dense_from_sparse,
    gather_pre,
    select_flat,
    select_per_row,
    sparse_decode,
)
from mechscope.sae.architectures.topk import TopKConfig
from mechscope.sae.base import SAE

from .conftest import knobs_for

# the architectures that choose latents by rank and train through the sparse kernels
RANKED = [name for name in registered_architectures() if issubclass(sae_class(name).config_class, TopKConfig)]


def _dense_and_sparse(sae, x, target=None, dead_mask=None):
    results = []
    for loss_fn in (sae.training_loss, lambda *a, **k: SAE.training_loss(sae, *a, **k)):
        sae.zero_grad()
        if hasattr(sae, "threshold"):
            sae.threshold.zero_()
        out = loss_fn(x, target, dead_mask=dead_mask)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters()}
        results.append((out, grads, getattr(sae, "threshold", torch.zeros(())).clone()))
    return results


@pytest.mark.parametrize("arch", RANKED)
@pytest.mark.parametrize(
    "b_dec_in, skip, transcoder", [(True, False, False), (False, False, False), (False, True, True)]
)
@pytest.mark.parametrize("n_dead", [0, 20])
def test_sparse_training_equals_dense(arch, b_dec_in, skip, transcoder, n_dead):
    gen = torch.Generator().manual_seed(n_dead + 7 * skip + 3 * b_dec_in)
    d_in, d_out = 12, (10 if transcoder else 12)
    cfg = SAEConfig(d_in=d_in, d_sae=48, d_out=d_out if transcoder else None, architecture=arch, k=5, aux_k=16,
                    apply_b_dec_to_input=b_dec_in, skip_connection=skip)  # fmt: skip
    sae = make_sae(cfg, seed=1)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(40, d_in, generator=gen)
    target = torch.randn(40, d_out, generator=gen) if transcoder else None
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48, generator=gen)[:n_dead]] = True
    (sparse, g_sparse, t_sparse), (dense, g_dense, t_dense) = _dense_and_sparse(sae, x, target, dead)
    assert set(sparse.losses) == set(dense.losses)
    for name in dense.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.acts, dense.acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse.recons, dense.recons, atol=1e-5, rtol=1e-5)
    assert set(g_sparse) == set(g_dense)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(t_sparse, t_dense)


def test_hooked_latents_use_the_dense_graph():
    sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
    x = torch.randn(6, 8)
    sae.hook_sae_acts_post.add_hook(lambda acts, *, hook: acts * 0)
    out = sae.training_loss(x)
    torch.testing.assert_close(out.recons, sae.b_dec.expand(6, 8))
    out.loss.backward()
    assert sae.W_enc.grad.abs().sum() == 0


def test_kernels_against_dense_matrices():
    gen = torch.Generator().manual_seed(0)
    x, W_enc, b_enc, b_dec = (torch.randn(s, generator=gen) for s in [(9, 5), (5, 11), (11,), (5,)])
    W_dec = torch.randn(11, 4, generator=gen)
    params = [t.requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
    pre = ((x - b_dec) @ W_enc + b_enc).detach()
    for rows, cols in (select_per_row(pre.topk(3).indices), select_flat(pre.reshape(-1).topk(20).indices, 11)):
        assert torch.all(rows[1:] >= rows[:-1])
        values = gather_pre(x, W_enc, b_enc, b_dec, pre, rows, cols)
        out = sparse_decode(values, rows, cols, W_dec, 9)
        weight = torch.randn(out.shape, generator=gen)
        sparse_grads = torch.autograd.grad((out * weight).sum(), params)
        mask = dense_from_sparse(torch.ones_like(values), rows, cols, (9, 11))
        dense_out = (((x - b_dec) @ W_enc + b_enc) * mask) @ W_dec
        torch.testing.assert_close(out, dense_out, atol=1e-5, rtol=1e-5)
        for got, want in zip(sparse_grads, torch.autograd.grad((dense_out * weight).sum(), params), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", registered_architectures())
def test_folded_b_dec_encoder_equals_subtracting_it(arch):
    """`encoder_pre` folds b_dec into the bias; an (identity) input hook forces the plain form."""
    gen = torch.Generator().manual_seed(3)
    sae = make_sae(SAEConfig(d_in=10, d_sae=24, architecture=arch, **knobs_for(arch, k=4)), seed=2)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    x = torch.randn(16, 10, generator=gen)
    results = []
    for hooked in (False, True):
        handle = sae.hook_sae_input.add_hook(lambda t, *, hook: t) if hooked else None
        sae.zero_grad()
        if hasattr(sae, "threshold"):
            sae.threshold.zero_()
        out = SAE.training_loss(sae, x)
        out.loss.backward()
        results.append(
            (out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None})
        )
        if handle is not None:
            handle.remove()
    (folded, g_folded), (plain, g_plain) = results
    torch.testing.assert_close(folded, plain, atol=1e-5, rtol=1e-5)
    assert set(g_folded) == set(g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_folded[name], g_plain[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", RANKED)
def test_an_edited_input_trains_through_the_dense_graph(arch):
    gen = torch.Generator().manual_seed(5)
    sae = make_sae(SAEConfig(d_in=8, d_sae=24, architecture=arch, k=3), seed=4)
    with torch.no_grad():
        sae.b_dec.normal_(generator=gen)
    x = torch.randn(12, 8, generator=gen)
    sae.hook_sae_input.add_hook(lambda t, *, hook: 2 * t)
    (edited, g_edited, _), (dense, g_dense, _) = _dense_and_sparse(sae, x)
    torch.testing.assert_close(edited.loss, dense.loss)
    for name in g_dense:
        torch.testing.assert_close(g_edited[name], g_dense[name], msg=name)
    # and the edit matters: the same SAE without it trains to another gradient
    sae.hook_sae_input.remove_hooks()
    sae.zero_grad()
    sae.training_loss(x).loss.backward()
    assert not torch.allclose(sae.W_enc.grad, g_edited["W_enc"])

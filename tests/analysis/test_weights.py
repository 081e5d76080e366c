"""FactoredMatrix against dense linear algebra; head circuits against the forward pass."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.analysis import FactoredMatrix, composition_scores, head_weights, ov_copying_scores, svd_top_tokens
from tests.conftest import tiny_model

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(7, 3, 5), (2, 4, 9, 2, 9), (4, 6, 3)])
def test_factored_matrix_matches_dense(shape):
    *batch, ldim, mdim, rdim = shape
    A, B = _rand(*batch, ldim, mdim), _rand(*batch, mdim, rdim)
    fm, dense = FactoredMatrix(A, B), A @ B
    assert fm.shape == dense.shape and fm.ndim == dense.dim()
    assert_close(fm.AB, dense)
    assert_close(fm.T.AB, dense.transpose(-1, -2))
    assert_close(fm.norm(), torch.linalg.matrix_norm(dense))
    U, S, V = fm.svd()
    k = min(ldim, mdim, rdim)
    assert U.shape[-1] == S.shape[-1] == V.shape[-1] == k
    assert_close(S, torch.linalg.svdvals(dense)[..., :k])
    assert_close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), dense)
    eye = torch.eye(k, dtype=torch.float64).expand(*batch, k, k)
    assert_close(U.transpose(-1, -2) @ U, eye)
    assert_close(V.transpose(-1, -2) @ V, eye)
    assert_close(fm.get_corner(2), dense[tuple(slice(2) for _ in range(dense.dim()))])
    other = _rand(rdim, 4)
    assert_close((fm @ other).AB, dense @ other)
    left = _rand(3, ldim)
    assert_close((left @ fm).AB, left @ dense)
    assert_close((fm * 2.5).AB, 2.5 * dense)
    assert_close((2.5 * fm).AB, 2.5 * dense)


def test_factored_products_and_eigenvalues():
    f = FactoredMatrix(_rand(8, 3), _rand(3, 8))
    g = FactoredMatrix(_rand(8, 5), _rand(5, 6))
    assert_close((f @ g).AB, f.AB @ g.AB)
    assert (f @ g).mdim == 3 and (g.T @ f.T).mdim == 3
    eig = f.eigenvalues
    dense = torch.linalg.eigvals(f.AB)
    big = dense[dense.abs().argsort(descending=True)[:3]]
    key = lambda z: (round(z.real.item(), 6), round(z.imag.item(), 6))  # noqa: E731
    assert_close(torch.stack(sorted(eig, key=key)), torch.stack(sorted(big, key=key)))
    wide = FactoredMatrix(_rand(3, 6), _rand(6, 3))  # mdim > ldim: the eigenvalues of BA, AB's and zeros
    top = wide.eigenvalues[wide.eigenvalues.abs().argsort(descending=True)[:3]]
    assert_close(torch.sort(top.real).values, torch.sort(torch.linalg.eigvals(wide.AB).real).values)
    batched = FactoredMatrix(_rand(2, 3, 6, 2), _rand(2, 3, 2, 6))
    assert_close(batched[1, 2].AB, batched.AB[1, 2])
    assert_close(batched[1].AB, batched.AB[1])


def test_factored_matrix_errors():
    with pytest.raises(ms.InputError, match="inner dimensions"):
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 3))
    fm = FactoredMatrix(torch.randn(3, 2), torch.randn(2, 4))
    with pytest.raises(ms.InputError, match="square"):
        fm.eigenvalues  # noqa: B018
    with pytest.raises(ms.InputError, match="too long"):
        fm[0, 0, 0]


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_head_circuits_reproduce_attention(kv_heads):
    """Scores = ln1(x_q) QK ln1(x_k)^T * scale and head outputs = pattern @ (ln1(x) OV), for MHA, GQA and MQA."""
    model = tiny_model(n_key_value_heads=kv_heads, seed=2)
    tokens = torch.tensor([[3, 14, 15, 9, 26, 5]])
    model.set_use_attn_result(True)
    _, cache = model.run_with_cache(
        tokens,
        names_filter=[
            "blocks.1.ln1.hook_out",
            "blocks.1.attn.hook_attn_scores",
            "blocks.1.attn.hook_pattern",
            "blocks.1.attn.hook_result",
        ],
    )
    w = head_weights(model)
    x = cache["blocks.1.ln1.hook_out"][0]  # [pos, d_model], the norm's output (weights applied)
    scale = model.cfg.d_head**-0.5
    for head in range(model.cfg.n_heads):
        scores = x @ w.QK[1, head].AB @ x.T * scale
        expected = cache["attn_scores", 1][0, head]
        causal = torch.isfinite(expected)
        assert_close(scores[causal], expected[causal], rtol=1e-4, atol=1e-5)
        result = cache["pattern", 1][0, head] @ (x @ w.OV[1, head].AB)
        assert_close(result, cache["result", 1][0, :, head], rtol=1e-4, atol=1e-5)


def test_composition_scores_match_dense():
    model = tiny_model(n_key_value_heads=2, seed=4)
    w = head_weights(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for mode in ("Q", "K", "V"):
        scores = composition_scores(model, mode)
        for l1 in range(L):
            for h1 in range(H):
                ov = w.OV[l1, h1].AB
                for l2 in range(L):
                    for h2 in range(H):
                        reader = {"Q": w.QK[l2, h2].AB, "K": w.QK[l2, h2].AB.T, "V": w.OV[l2, h2].AB}[mode]
                        expected = (ov @ reader).norm() / (ov.norm() * reader.norm()) if l2 > l1 else torch.tensor(0.0)
                        assert_close(scores[l1, h1, l2, h2], expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ms.InputError, match="'Q', 'K' or 'V'"):
        composition_scores(model, "O")


def test_ov_copying_scores_match_dense_eigenvalues():
    model = tiny_model(seed=5)
    scores = ov_copying_scores(model)
    w = head_weights(model)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            full = (model.W_E @ w.OV[layer, head].AB @ model.W_U).detach().double()
            eig = torch.linalg.eigvals(full)
            expected = eig.sum().real / eig.abs().sum()
            assert_close(scores[layer, head].double(), expected, rtol=1e-3, atol=1e-4)
    # An embedding-aligned OV of +I copies, -I suppresses.
    cfg = ms.ModelConfig(d_model=8, n_layers=1, n_heads=1, d_mlp=4, d_vocab=8, n_ctx=8, attn_only=True)
    toy = ms.HookedTransformer(cfg).init_weights(seed=0)
    with torch.no_grad():
        toy.embed.W_E.copy_(torch.eye(8))
        toy.unembed.w_u.copy_(torch.eye(8))
        toy.blocks[0].attn.w_v.copy_(torch.eye(8))
        toy.blocks[0].attn.w_o.copy_(-torch.eye(8))
    assert_close(ov_copying_scores(toy), torch.tensor([[-1.0]]))


def test_svd_top_tokens():
    model = tiny_model(seed=6)
    w = head_weights(model)
    for circuit, fm in (("OV", w.OV[2, 1]), ("QK", w.QK[2, 1])):
        dirs = svd_top_tokens(model, 2, 1, circuit=circuit, n_directions=3, k=4)
        assert_close(torch.tensor([d.singular_value for d in dirs]), torch.linalg.svdvals(fm.AB.detach())[:3])
        U, S, V = fm.svd()
        out_space = model.W_U.T if circuit == "OV" else model.W_E
        assert dirs[0].output_tokens == [str(int(i)) for i in (out_space.detach() @ V[:, 0]).topk(4).indices]
        assert "->" in str(dirs[0])
    with pytest.raises(ms.InputError, match="no head L3H0"):
        svd_top_tokens(model, 3, 0)

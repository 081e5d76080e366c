"""FactoredMatrix against dense linear algebra, with TransformerLens' meanings (svd -> V,
eigenvalues as a property, vector products, row/column indexing, scalar tensors)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.analysis import FactoredMatrix

GEN = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(7, 3, 5), (2, 4, 9, 2, 9), (4, 6, 3), (3, 8, 4)])
def test_svd_returns_u_s_v(shape):
    *batch, ldim, mdim, rdim = shape
    fm = FactoredMatrix(_rand(*batch, ldim, mdim), _rand(*batch, mdim, rdim))
    dense = fm.AB
    U, S, V = fm.svd()
    k = min(ldim, mdim, rdim)
    assert U.shape == (*batch, ldim, k) and S.shape == (*batch, k) and V.shape == (*batch, rdim, k)
    assert_close(U @ torch.diag_embed(S) @ V.transpose(-1, -2), dense)
    assert_close(S, torch.linalg.svdvals(dense)[..., :k])
    eye = torch.eye(k, dtype=torch.float64).expand(*batch, k, k)
    assert_close(U.transpose(-1, -2) @ U, eye)
    assert_close(V.transpose(-1, -2) @ V, eye)
    assert fm.U is U and fm.V is V and fm.S is S  # cached
    with pytest.warns(DeprecationWarning, match="returns V"):
        assert fm.Vh is V
    assert_close(fm.norm(), torch.linalg.matrix_norm(dense))
    assert_close(fm.collapse_l(), S[..., :, None] * V.transpose(-1, -2))
    assert_close(fm.collapse_r(), U * S[..., None, :])
    assert_close(fm.make_even().AB, dense)


def test_eigenvalues_is_a_property_of_ba():
    f = FactoredMatrix(_rand(8, 3), _rand(3, 8))
    eig = f.eigenvalues
    assert eig.shape == (3,)
    dense = torch.linalg.eigvals(f.AB)
    big = dense[dense.abs().argsort(descending=True)[:3]]
    assert_close(torch.sort(eig.real).values, torch.sort(big.real).values)
    wide = FactoredMatrix(_rand(3, 6), _rand(6, 3))  # mdim > ldim: the mdim eigenvalues of BA
    assert wide.eigenvalues.shape == (6,)
    with pytest.raises(ms.InputError, match="square"):
        _ = FactoredMatrix(_rand(3, 2), _rand(2, 4)).eigenvalues


def test_products():
    fm = FactoredMatrix(_rand(6, 3), _rand(3, 5))
    dense = fm.AB
    m = _rand(5, 4)
    assert_close((fm @ m).AB, dense @ m)
    assert (fm @ m).mdim == 3 and (fm @ _rand(5, 2)).mdim == 3
    narrow = FactoredMatrix(_rand(6, 4), _rand(4, 3))  # rdim <= mdim: TransformerLens collapses to rdim
    assert (narrow @ _rand(3, 5)).mdim == 3
    left = _rand(2, 6)
    assert_close((left @ fm).AB, left @ dense)
    v, w = _rand(5), _rand(6)
    assert_close(fm @ v, dense @ v)
    assert_close(w @ fm, w @ dense)
    g = FactoredMatrix(_rand(5, 4), _rand(4, 7))
    assert_close((fm @ g).AB, dense @ g.AB)
    assert (fm * torch.tensor([2.0])).shape == fm.shape
    assert_close((fm * torch.tensor([2.0])).AB, 2 * dense)
    assert_close((2.5 * fm).AB, 2.5 * dense)
    batched = FactoredMatrix(_rand(2, 3, 4, 2), _rand(2, 3, 2, 4))
    scale = _rand(2, 3)
    assert_close((batched * scale).AB, scale[..., None, None] * batched.AB)
    with pytest.raises(ms.InputError, match="leading shape"):
        batched * _rand(4)


def test_indexing_rows_and_columns():
    fm = FactoredMatrix(_rand(2, 3, 6, 2), _rand(2, 3, 2, 5))
    dense = fm.AB
    assert_close(fm[1].AB, dense[1])
    assert_close(fm[1, 2].AB, dense[1, 2])
    assert_close(fm[1, 2, 0].AB, dense[1, 2, 0:1])
    assert_close(fm[1, 2, -1].AB, dense[1, 2, -1:])
    assert_close(fm[1, 2, :3, -1].AB, dense[1, 2, :3, -1:])
    assert_close(fm[:, :, 1:4, 2:].AB, dense[:, :, 1:4, 2:])
    with pytest.raises(ms.InputError, match="too long"):
        fm[0, 0, 0, 0, 0]
    assert_close(fm.get_corner(2), dense[:2, :2, :2, :2])
    assert fm.unsqueeze(0).shape == (1, 2, 3, 6, 5) and fm.pair[0] is fm.A


def test_errors_name_the_problem():
    with pytest.raises(ms.InputError, match="inner dimensions"):
        FactoredMatrix(torch.randn(3, 4), torch.randn(5, 3))
    with pytest.raises(ms.InputError, match="columns"):
        FactoredMatrix(torch.randn(3, 2), torch.randn(2, 4)) @ torch.randn(3, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ = FactoredMatrix(torch.randn(3, 2), torch.randn(2, 4)).V  # no warning for the canonical name


@pytest.mark.parametrize(
    "mistake",
    [
        lambda: FactoredMatrix(torch.ones(9, 5, 3), torch.ones(2, 4, 3, 7)),  # leading dims mismatch
        lambda: FactoredMatrix(torch.ones(3, 2), torch.ones(2, 4)).BA,  # BA of a non-square matrix
        lambda: FactoredMatrix(torch.ones(3, 2), torch.ones(2, 4)).eigenvalues,
        lambda: FactoredMatrix(torch.ones(3, 2), torch.ones(2, 4)) * torch.ones(2),  # not a scalar
        lambda: torch.ones(2, 2) * FactoredMatrix(torch.ones(6, 2, 3), torch.ones(6, 3, 4)),
    ],
)
def test_shape_mistakes_raise_what_transformer_lens_and_torch_raise(mistake):
    """TransformerLens asserts (``AssertionError``) and torch raises ``RuntimeError`` for these: the
    `ShapeError` mechscope raises is both, and still an ``InputError``."""
    with pytest.raises(ms.errors.ShapeError) as caught:
        mistake()
    assert isinstance(caught.value, AssertionError) and isinstance(caught.value, RuntimeError)
    assert isinstance(caught.value, ms.InputError)
    assert not isinstance(caught.value, KeyError)


def test_a_valid_product_raises_nothing():
    fm = FactoredMatrix(torch.ones(6, 2, 3), torch.ones(6, 3, 4))
    assert_close((torch.full((6,), 2.0) * fm).AB, 2 * fm.AB)


class Wrapped:
    """Multiplies like a tensor without being one (``ndim``, ``shape``, ``@``, ``broadcast_to``)."""

    def __init__(self, t):
        self.t = t

    ndim = property(lambda self: self.t.ndim)
    shape = property(lambda self: self.t.shape)

    def broadcast_to(self, shape):
        return Wrapped(self.t.broadcast_to(shape))

    def unsqueeze(self, dim):
        return Wrapped(self.t.unsqueeze(dim))

    def squeeze(self, dim):
        return Wrapped(self.t.squeeze(dim))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return NotImplemented
        return Wrapped(self.t @ (other.t if isinstance(other, Wrapped) else other))

    def __rmatmul__(self, other):
        return Wrapped(other @ self.t)


def test_products_with_tensor_like_objects():
    fm = FactoredMatrix(_rand(4, 3), _rand(3, 6))
    right, left = _rand(6, 2), _rand(5, 4)
    product, rproduct = fm @ Wrapped(right), Wrapped(left) @ fm  # (.AB is annotated as a Tensor)
    assert_close((product.A @ product.B).t, fm.AB @ right)
    assert_close((rproduct.A @ rproduct.B).t, left @ fm.AB)
    assert_close((fm @ Wrapped(_rand(6))).t.shape, torch.Size([4]))
    assert fm.__matmul__(object()) is NotImplemented

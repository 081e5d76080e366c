"""`FactoredMatrix`: a low-rank product ``A @ B`` kept as its two factors (TransformerLens' API).

A head's ``QK = W_Q W_K^T`` and ``OV = W_V W_O`` are ``[d_model, d_model]`` matrices of rank at
most ``d_head``; the full OV circuit ``W_E W_V W_O W_U`` is ``[d_vocab, d_vocab]``. Their SVD,
eigenvalues and norms follow from ``d_head``-sized matrices, so nothing large is formed.

Every name has TransformerLens' meaning: ``svd()`` returns ``(U, S, V)`` with
``AB == U @ S.diag() @ V.T`` (``V``, not ``Vh``; the ``Vh`` property is TransformerLens'
deprecated alias of ``V``), ``eigenvalues`` is a property (the ``mdim`` eigenvalues of ``BA``),
products with matrices keep the smaller inner dimension as TransformerLens does, and products
with vectors return vectors.
"""

from __future__ import annotations

import warnings
from functools import cached_property

import torch
from jaxtyping import Complex, Float
from torch import Tensor

from mechscope.errors import InputError, ShapeError


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


class FactoredMatrix:
    """The matrix ``A @ B`` with ``A [..., ldim, mdim]`` and ``B [..., mdim, rdim]``, never formed unless asked.

    Leading dimensions broadcast (e.g. ``[layer, head, ...]``) and can be indexed.

    Example:
        >>> A, B = torch.randn(6, 2), torch.randn(2, 5)
        >>> fm = FactoredMatrix(A, B)
        >>> fm.shape, torch.allclose(fm.AB, A @ B)
        (torch.Size([6, 5]), True)
        >>> U, S, V = fm.svd()
        >>> U.shape, S.shape, V.shape, torch.allclose(U @ torch.diag(S) @ V.T, A @ B, atol=1e-5)
        (torch.Size([6, 2]), torch.Size([2]), torch.Size([5, 2]), True)
    """

    def __init__(self, A: Tensor, B: Tensor) -> None:
        """``A [..., ldim, mdim]`` and ``B [..., mdim, rdim]`` (checked here, with errors naming the fix)."""
        if A.ndim < 2 or B.ndim < 2:
            raise InputError(f"factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise ShapeError(
                f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)} "
                "(A.shape[-1] must equal B.shape[-2])"
            )
        try:
            batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as exc:
            raise ShapeError(
                f"leading dimensions mismatch (they do not broadcast): A is {tuple(A.shape)}, B is {tuple(B.shape)}"
            ) from exc
        # broadcast_to, not expand: factors may be tensor-like objects (see `__matmul__`)
        self.A = A.broadcast_to((*batch, *A.shape[-2:]))
        self.B = B.broadcast_to((*batch, *B.shape[-2:]))
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        self.shape = torch.Size((*batch, self.ldim, self.rdim))
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2

    @property
    def ndim(self) -> int:
        """The number of dimensions of the product ``AB`` (leading dimensions included)."""
        return len(self.shape)

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        """The factors ``(A, B)``."""
        return self.A, self.B

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    def __getitem__(self, index) -> FactoredMatrix:
        """Index the leading dimensions, and optionally the rows and then the columns of ``AB``.

        An integer row or column index keeps its axis (length 1), as in TransformerLens.

        Example:
            >>> fm = FactoredMatrix(torch.randn(3, 4, 6, 2), torch.randn(3, 4, 2, 5))
            >>> fm[1, 2].shape, fm[1, 2, 0].shape, fm[1, 2, :3, -1].shape
            (torch.Size([6, 5]), torch.Size([1, 5]), torch.Size([3, 1]))
        """
        index = index if isinstance(index, tuple) else (index,)
        length = len([i for i in index if i is not None])
        lead = self.ndim - 2
        if length <= lead:
            return FactoredMatrix(self.A[index], self.B[index])
        if length > self.ndim:
            raise InputError(f"{index} is too long an index for a FactoredMatrix with shape {tuple(self.shape)}")
        if length == lead + 1:
            index = (*index[:-1], _keep_axis(index[-1]))
            return FactoredMatrix(self.A[index], self.B[index[:-1]])
        index = (*index[:-2], _keep_axis(index[-2]), _keep_axis(index[-1]))
        return FactoredMatrix(self.A[index[:-1]], self.B[(*index[:-2], slice(None), index[-1])])

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """A new leading axis at ``k`` (counted over the factors' dimensions).

        Example:
            >>> FactoredMatrix(torch.randn(3, 5, 2), torch.randn(3, 2, 4)).unsqueeze(0).shape
            torch.Size([1, 3, 5, 4])
        """
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    # ------------------------------------------------------------------ algebra
    @property
    def AB(self) -> Float[Tensor, "... ldim rdim"]:
        """The full matrix."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... mdim mdim"]:
        """``B @ A`` (square when ``ldim == rdim``); it shares the non-zero eigenvalues of ``AB``."""
        if self.ldim != self.rdim:
            raise ShapeError(f"BA needs a square matrix, this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose ``B^T A^T``."""
        return FactoredMatrix(_t(self.B), _t(self.A))

    def __matmul__(self, other: Tensor | FactoredMatrix) -> FactoredMatrix | Tensor:
        """``self @ other``: a `FactoredMatrix` for a matrix (inner dimension ``min(mdim, rdim)``,
        as in TransformerLens), a tensor ``[..., ldim]`` for a vector.

        Example:
            >>> f = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 4))
            >>> g = FactoredMatrix(torch.randn(4, 3), torch.randn(3, 6))
            >>> torch.allclose((f @ g).AB, f.AB @ g.AB, atol=1e-5), (f @ g).mdim, (f @ torch.ones(4)).shape
            (True, 2, torch.Size([5]))
        """
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not _tensor_like(other):
            return NotImplemented
        if other.ndim < 2:
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ShapeError(f"right factor {tuple(other.shape)} does not match the {self.rdim} columns of {self!r}")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix | Tensor:
        """``other @ self``: a `FactoredMatrix` for a matrix, a tensor ``[..., rdim]`` for a vector."""
        if not _tensor_like(other):
            return NotImplemented
        if other.shape[-1] != self.ldim:
            raise ShapeError(f"left factor {tuple(other.shape)} does not match the {self.ldim} rows of {self!r}")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """Scale by a number or a one-element tensor (no axis is added). mechscope also takes a
        tensor shaped like the leading dimensions, scaling each matrix by its own entry.

        Example:
            >>> (FactoredMatrix(torch.ones(3, 2), torch.ones(2, 3)) * torch.tensor([2.0])).shape
            torch.Size([3, 3])
        """
        if isinstance(scalar, Tensor):
            if scalar.numel() == 1:
                scalar = scalar.reshape(())
            elif scalar.shape == self.shape[:-2]:
                scalar = scalar[..., None, None]
            else:
                raise ShapeError(
                    f"multiply by a number, a one-element tensor or a tensor of the leading shape "
                    f"{tuple(self.shape[:-2])}, got {tuple(scalar.shape)}; for matrix products use @"
                )
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # ------------------------------------------------------------------ spectra
    @cached_property
    def _svd(self) -> tuple[Tensor, Tensor, Tensor]:
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]  # [..., k_a, k_b]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, _t(Vhb) @ _t(Vhm)

    def svd(self) -> tuple[Float[Tensor, "... ldim k"], Float[Tensor, "... k"], Float[Tensor, "... rdim k"]]:
        """``(U, S, V)`` with ``AB == U @ S.diag() @ V.T``, ``k = min(ldim, mdim, rdim)``, ``S`` descending.

        Computed as TransformerLens does (SVDs of both factors, then of a small core), so the
        signs of the singular vectors match its; cached on the instance.

        Example:
            >>> fm = FactoredMatrix(torch.randn(6, 2), torch.randn(2, 5))
            >>> U, S, V = fm.svd()
            >>> torch.allclose(U @ torch.diag(S) @ V.T, fm.AB, atol=1e-5)
            True
            >>> torch.allclose(S, torch.linalg.svdvals(fm.AB)[:2], atol=1e-5)
            True
        """
        return self._svd

    @property
    def U(self) -> Float[Tensor, "... ldim k"]:
        """Left singular vectors: ``AB == U @ S.diag() @ V.T`` (see `svd`)."""
        return self.svd()[0]

    @property
    def S(self) -> Float[Tensor, "... k"]:
        """Singular values, descending."""
        return self.svd()[1]

    @property
    def V(self) -> Float[Tensor, "... rdim k"]:
        """Right singular vectors: ``AB == U @ S.diag() @ V.T``."""
        return self.svd()[2]

    @property
    def Vh(self) -> Float[Tensor, "... rdim k"]:
        """TransformerLens' deprecated alias of `V` (it returns ``V``, not its transpose)."""
        warnings.warn(
            "FactoredMatrix.Vh returns V (right singular vectors), as in TransformerLens; use .V, "
            "or .V.transpose(-2, -1) for the transpose",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Complex[Tensor, "... mdim"]:
        """The ``mdim`` eigenvalues of ``BA``: those of the square ``AB`` that may be non-zero.

        Example:
            >>> A = torch.randn(8, 3)
            >>> sorted(FactoredMatrix(A, A.T).eigenvalues.real.round(decimals=3).tolist()) == \\
            ...     sorted(torch.linalg.eigvalsh(A.T @ A).round(decimals=3).tolist())
            True
        """
        inner = self.BA
        if inner.dtype in (torch.bfloat16, torch.float16):
            inner = inner.float()
        return torch.linalg.eigvals(inner)

    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm, from ``||AB||^2 = sum((A^T A) * (B B^T))`` (``mdim x mdim`` matrices only).

        Example:
            >>> fm = FactoredMatrix(torch.randn(6, 2), torch.randn(2, 5))
            >>> torch.allclose(fm.norm(), fm.AB.norm(), atol=1e-5)
            True
        """
        gram_a = _t(self.A) @ self.A
        gram_b = self.B @ _t(self.B)
        return (gram_a * gram_b).sum((-1, -2)).clamp(min=0).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U S^1/2) (S^1/2 V^T)``: orthogonal columns and rows, balanced norms.

        Example:
            >>> fm = FactoredMatrix(torch.randn(6, 2), 10 * torch.randn(2, 5))
            >>> even = fm.make_even()
            >>> torch.allclose(even.AB, fm.AB, atol=1e-4), torch.allclose(even.A.norm(dim=0), even.B.norm(dim=1))
            (True, True)
        """
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.V))

    def collapse_l(self) -> Float[Tensor, "... k rdim"]:
        """``S V^T``: the matrix with its left orthogonal factor ``U`` removed.

        Example:
            >>> fm = FactoredMatrix(torch.randn(6, 2), torch.randn(2, 5))
            >>> fm.collapse_l().shape, torch.allclose(fm.U @ fm.collapse_l(), fm.AB, atol=1e-5)
            (torch.Size([2, 5]), True)
        """
        return self.S[..., :, None] * _t(self.V)

    def collapse_r(self) -> Float[Tensor, "... ldim k"]:
        """``U S``: the matrix with its right orthogonal factor ``V^T`` removed.

        Example:
            >>> fm = FactoredMatrix(torch.randn(6, 2), torch.randn(2, 5))
            >>> fm.collapse_r().shape, torch.allclose(fm.collapse_r() @ fm.V.T, fm.AB, atol=1e-5)
            (torch.Size([6, 2]), True)
        """
        return self.U * self.S[..., None, :]

    def get_corner(self, k: int = 3) -> Float[Tensor, "..."]:
        """The first ``k`` entries along every axis of ``AB`` (leading axes included, as in TransformerLens).

        Example:
            >>> fm = FactoredMatrix(torch.randn(4, 6, 2), torch.randn(4, 2, 5))
            >>> fm.get_corner(3).shape, torch.allclose(fm.get_corner(3), fm.AB[:3, :3, :3], atol=1e-6)
            (torch.Size([3, 3, 3]), True)
        """
        corner = self.A[..., :k, :] @ self.B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.dim()))]


def _tensor_like(x) -> bool:
    """A tensor, or an object that multiplies like one (``ndim``, ``shape``, ``@``, ``broadcast_to``,
    ``unsqueeze``, ``squeeze``), as TransformerLens' factored products accept."""
    return isinstance(x, Tensor) or all(hasattr(x, a) for a in ("ndim", "shape", "__matmul__", "broadcast_to"))


def _keep_axis(index):
    """An integer index as a one-element slice (``-1`` as ``slice(-1, None)``), so the axis stays."""
    if isinstance(index, int):
        return slice(index, index + 1 if index != -1 else None)
    return index

"""`FactoredMatrix`: a low-rank product ``A @ B`` kept as its two factors.

A head's ``QK = W_Q W_K^T`` and ``OV = W_V W_O`` are ``[d_model, d_model]`` matrices of rank at
most ``d_head``; the full OV circuit ``W_E W_V W_O W_U`` is ``[d_vocab, d_vocab]``. Their SVD,
eigenvalues and norms follow exactly from ``d_head``-sized matrices, so nothing large is formed.
"""

from __future__ import annotations

from typing import Union

import torch
from jaxtyping import Complex, Float
from torch import Tensor

from mechscope.errors import InputError


class FactoredMatrix:
    """The matrix ``A @ B`` with ``A [..., ldim, mdim]`` and ``B [..., mdim, rdim]``, never formed unless asked.

    Leading dimensions broadcast (e.g. ``[layer, head, ...]``) and can be indexed.

    Example:
        >>> A, B = torch.randn(6, 2), torch.randn(2, 5)
        >>> fm = FactoredMatrix(A, B)
        >>> fm.shape, torch.allclose(fm.AB, A @ B)
        (torch.Size([6, 5]), True)
        >>> U, S, Vh = fm.svd()
        >>> S.shape, torch.allclose(U @ torch.diag(S) @ Vh, A @ B, atol=1e-5)
        (torch.Size([2]), True)
    """

    def __init__(self, A: Float[Tensor, "... ldim mdim"], B: Float[Tensor, "... mdim rdim"]) -> None:
        if A.dim() < 2 or B.dim() < 2:
            raise InputError(f"factors must be at least 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
        if A.shape[-1] != B.shape[-2]:
            raise InputError(
                f"inner dimensions differ: A is {tuple(A.shape)}, B is {tuple(B.shape)} (A.shape[-1] must equal B.shape[-2])"
            )
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = A.expand(*batch, *A.shape[-2:])
        self.B = B.expand(*batch, *B.shape[-2:])

    # ------------------------------------------------------------------ shape
    @property
    def ldim(self) -> int:
        return self.A.shape[-2]

    @property
    def mdim(self) -> int:
        return self.A.shape[-1]

    @property
    def rdim(self) -> int:
        return self.B.shape[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.A.shape[:-2], self.ldim, self.rdim))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"FactoredMatrix(shape={list(self.shape)}, mdim={self.mdim})"

    def __getitem__(self, index) -> FactoredMatrix:
        """Index the leading (batch) dimensions only.

        Example:
            >>> FactoredMatrix(torch.randn(3, 4, 6, 2), torch.randn(3, 4, 2, 6))[1, 2].shape
            torch.Size([6, 6])
        """
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.ndim - 2:
            raise InputError(f"only the {self.ndim - 2} leading dimensions can be indexed; use .AB for entries")
        return FactoredMatrix(self.A[index], self.B[index])

    # ------------------------------------------------------------------ algebra
    @property
    def AB(self) -> Float[Tensor, "... ldim rdim"]:
        """The full matrix."""
        return self.A @ self.B

    @property
    def BA(self) -> Float[Tensor, "... mdim mdim"]:
        """``B @ A`` (square when ``ldim == rdim``); it shares the non-zero eigenvalues of ``AB``."""
        if self.ldim != self.rdim:
            raise InputError(f"BA needs a square matrix, this one is {self.ldim} x {self.rdim}")
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose ``B^T A^T``."""
        return FactoredMatrix(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    def __matmul__(self, other: Union[Tensor, FactoredMatrix]) -> FactoredMatrix:
        """``self @ other`` kept factored through the smaller inner dimension.

        Example:
            >>> f, g = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 4)), FactoredMatrix(torch.randn(4, 3), torch.randn(3, 6))
            >>> torch.allclose((f @ g).AB, f.AB @ g.AB, atol=1e-5), (f @ g).mdim
            (True, 2)
        """
        if isinstance(other, FactoredMatrix):
            middle = self.B @ other.A  # [..., mdim, other.mdim]
            if self.mdim <= other.mdim:
                return FactoredMatrix(self.A, middle @ other.B)
            return FactoredMatrix(self.A @ middle, other.B)
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() == 1:
            raise InputError("multiply by a matrix; for a vector use fm.A @ (fm.B @ v)")
        return FactoredMatrix(self.A, self.B @ other)

    def __rmatmul__(self, other: Tensor) -> FactoredMatrix:
        if not isinstance(other, Tensor):
            return NotImplemented
        if other.dim() == 1:
            raise InputError("multiply by a matrix; for a vector use (v @ fm.A) @ fm.B")
        return FactoredMatrix(other @ self.A, self.B)

    def __mul__(self, scalar: float | Tensor) -> FactoredMatrix:
        """Scale by a number (or a tensor broadcasting over the leading dimensions)."""
        if isinstance(scalar, Tensor) and scalar.dim() > 0:
            scalar = scalar[..., None, None]
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    # ------------------------------------------------------------------ spectra
    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Exact reduced SVD ``(U [..., ldim, k], S [..., k], Vh [..., k, rdim])`` with ``k = min(mdim, ldim, rdim)``.

        Computed from QR factorisations of ``A`` and ``B^T`` and the SVD of a ``k x k`` core, so
        ``AB`` is never formed. ``S`` is in descending order, like `torch.linalg.svd`.
        """
        if self.mdim > min(self.ldim, self.rdim):
            return torch.linalg.svd(self.AB, full_matrices=False)
        q_a, r_a = torch.linalg.qr(self.A)  # [..., ldim, mdim], [..., mdim, mdim]
        q_b, r_b = torch.linalg.qr(self.B.transpose(-1, -2))  # [..., rdim, mdim], [..., mdim, mdim]
        u, s, vh = torch.linalg.svd(r_a @ r_b.transpose(-1, -2))
        return q_a @ u, s, vh @ q_b.transpose(-1, -2)

    @property
    def S(self) -> Float[Tensor, "... k"]:
        """Singular values, descending."""
        return self.svd()[1]

    def eigenvalues(self) -> Complex[Tensor, "... k"]:
        """The ``min(mdim, ldim)`` eigenvalues of the square ``AB`` that may be non-zero (those of ``BA``).

        Example:
            >>> A = torch.randn(8, 3)
            >>> sorted(FactoredMatrix(A, A.T).eigenvalues().real.round(decimals=3).tolist()) == \\
            ...     sorted(torch.linalg.eigvalsh(A.T @ A).round(decimals=3).tolist())
            True
        """
        if self.ldim != self.rdim:
            raise InputError(f"eigenvalues need a square matrix, this one is {self.ldim} x {self.rdim}")
        if self.mdim > self.ldim:
            return torch.linalg.eigvals(self.AB)
        return torch.linalg.eigvals(self.BA)

    def norm(self) -> Float[Tensor, "..."]:
        """Frobenius norm, from ``||AB||^2 = sum((A^T A) * (B B^T))`` (``mdim x mdim`` matrices only)."""
        gram_a = self.A.transpose(-1, -2) @ self.A
        gram_b = self.B @ self.B.transpose(-1, -2)
        return (gram_a * gram_b).sum((-1, -2)).clamp(min=0).sqrt()

    def get_corner(self, k: int = 3) -> Float[Tensor, "... k k"]:
        """The top-left ``k x k`` block of ``AB``."""
        return self.A[..., :k, :] @ self.B[..., :, :k]

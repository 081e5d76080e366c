"""Subspaces of an activation space: orthonormal bases, coordinates and the interchange of a component.

A subspace of a site's activation space (its last axis, ``d_act``: ``d_model``, ``d_mlp`` or
``d_head``) is held as a basis of orthonormal columns ``[d_act, d_sub]``; several subspaces as
``[direction, d_act, d_sub]``. Subspaces of different sizes are padded with zero columns, which
add nothing to a projection, so one tensor holds them all.

Axis names added to the vocabulary of `mechscope.names` here: ``d_act`` (the width of the
activation a subspace lives in), ``d_sub`` (a subspace's dimension) and ``direction`` (one
entry per subspace of a batch of them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError

Directions = Tensor | Sequence[Tensor]


def orthonormal_basis(vectors: Float[Tensor, "d_act d_sub"], tol: float = 1e-6) -> Float[Tensor, "d_act d_sub"]:
    """Orthonormal columns spanning the columns of ``vectors`` (Gram-Schmidt order, signs kept).

    A single column is just normalised; linearly dependent columns raise `InputError`.

    Example:
        >>> orthonormal_basis(torch.tensor([[3.0, 1.0], [0.0, 1.0]])).abs()
        tensor([[1., 0.],
                [0., 1.]])
    """
    if vectors.dim() != 2 or vectors.shape[1] == 0:
        raise InputError(f"a basis is [d_act, d_sub] with d_sub >= 1, got shape {tuple(vectors.shape)}")
    q, r = torch.linalg.qr(vectors.float())
    diag = r.diagonal()
    scale = vectors.float().norm(dim=0).max()
    if bool((diag.abs() <= tol * scale).any()) or float(scale) == 0.0:
        raise InputError(
            f"the {vectors.shape[1]} vectors of this subspace are linearly dependent (or zero); "
            "pass independent vectors, or fewer columns"
        )
    return (q * diag.sign()).to(vectors.dtype)


def as_bases(directions: Directions, d_act: int | None = None) -> Float[Tensor, "direction d_act d_sub"]:
    """Subspaces as one tensor of orthonormal bases ``[direction, d_act, d_sub]``.

    ``directions`` may be a direction ``[d_act]``; several directions ``[direction, d_act]``
    (one per row); bases ``[direction, d_act, d_sub]`` (columns span each subspace); a learned
    subspace (anything with a ``basis [d_act, d_sub]``); or a list whose entries are directions
    ``[d_act]``, bases ``[d_act, d_sub]`` or learned subspaces. Each subspace is
    orthonormalised (a direction is normalised; all-zero columns count as padding); narrower ones
    are padded with zero columns.
    ``d_act``, when given, is checked.

    Example:
        >>> as_bases(torch.tensor([[2.0, 0.0], [0.0, 1.0]])).shape
        torch.Size([2, 2, 1])
        >>> as_bases([torch.tensor([1.0, 1.0]), torch.eye(2)])[0]
        tensor([[0.7071, 0.0000],
                [0.7071, 0.0000]])
    """
    if hasattr(directions, "basis"):  # a learned subspace (`mechscope.subspace.LearnedSubspace`)
        directions = [directions.basis]
    if isinstance(directions, Tensor):
        if directions.dim() == 1:
            items = [directions[:, None]]
        elif directions.dim() == 2:
            items = [row[:, None] for row in directions]
        elif directions.dim() == 3:
            items = list(directions)
        else:
            raise InputError(
                f"directions must be [d_act], [direction, d_act] or [direction, d_act, d_sub], "
                f"got shape {tuple(directions.shape)}"
            )
    else:
        items = [torch.as_tensor(getattr(v, "basis", v)) for v in directions]
        items = [v[:, None] if v.dim() == 1 else v for v in items]
    if not items:
        raise InputError("no directions given; pass at least one direction or basis")
    widths = {v.shape[0] for v in items}
    if len(widths) != 1 or any(v.dim() != 2 for v in items):
        raise InputError(f"every direction must have the same width d_act, got widths {sorted(widths)}")
    if d_act is not None and widths != {d_act}:
        raise InputError(f"directions have width {widths.pop()} but the activation has d_act={d_act}")
    bases = [orthonormal_basis(v[:, v.ne(0).any(0)] if bool(v.ne(0).any()) else v) for v in items]
    d_sub = max(b.shape[1] for b in bases)
    return torch.stack([torch.nn.functional.pad(b, (0, d_sub - b.shape[1])) for b in bases])


def coordinates(
    activation: Float[Tensor, "... d_act"], bases: Float[Tensor, "direction d_act d_sub"]
) -> Float[Tensor, "... direction d_sub"]:
    """The coordinates of ``activation`` in every basis of ``bases``.

    Example:
        >>> coordinates(torch.tensor([[1.0, 2.0]]), as_bases(torch.eye(2))).squeeze(-1)
        tensor([[1., 2.]])
    """
    return torch.einsum("...d,ndk->...nk", activation, bases.to(activation.dtype))


def interchange(
    base: Float[Tensor, "... d_act"],
    source: Float[Tensor, "... d_act"],
    basis: Float[Tensor, "d_act d_sub"],
    mask: Float[Tensor, " d_sub"] | None = None,
) -> Float[Tensor, "... d_act"]:
    """``base`` with its component in the subspace replaced by ``source``'s:
    ``base + B diag(mask) Bᵀ (source - base)`` (``mask`` weights each basis column; default all ones).

    Example:
        >>> interchange(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 7.0]), torch.tensor([[1.0], [0.0]]))
        tensor([5., 2.])
    """
    basis = basis.to(base.dtype)
    delta = (source - base) @ basis
    if mask is not None:
        delta = delta * mask.to(base.dtype)
    return base + delta @ basis.T


def split_subspace(
    basis: Float[Tensor, "d_act d_sub"], readers: Float[Tensor, "d_act d_read"], tol: float = 1e-5
) -> tuple[Float[Tensor, "d_act d_sub"], Float[Tensor, "d_act d_sub"]]:
    """Split the columns of ``basis`` into their components in the row space of the downstream
    weights ``readers`` (the directions they read, ``x @ readers``) and in the kernel (what they
    do not read). Returns the two component matrices; they sum to ``basis``.

    The row space is spanned by the left singular vectors of ``readers`` with singular values
    above ``tol`` times the largest.

    Example:
        >>> row, kernel = split_subspace(torch.tensor([[0.6], [0.8]]), torch.tensor([[1.0], [0.0]]))
        >>> row.flatten().tolist(), kernel.flatten().tolist()
        ([0.6000000238418579, 0.0], [0.0, 0.800000011920929])
    """
    if readers.dim() != 2 or readers.shape[0] != basis.shape[0]:
        raise InputError(
            f"downstream weights must be [d_act={basis.shape[0]}, d_read] (activation @ weights), "
            f"got shape {tuple(readers.shape)}"
        )
    u, s, _ = torch.linalg.svd(readers.float(), full_matrices=False)
    row_space = u[:, s > tol * s.max()] if len(s) and float(s.max()) > 0 else u[:, :0]
    row = row_space @ (row_space.T @ basis.float())
    return row.to(basis.dtype), (basis.float() - row).to(basis.dtype)

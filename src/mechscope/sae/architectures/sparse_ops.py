"""Sparse training kernels for SAEs whose latents are chosen by rank (TopK, BatchTopK).

Only a few of ``d_sae`` latents are active per token, yet the dense formulation multiplies
``[batch, d_sae]`` matrices three more times after the encoder (decoder forward, decoder
weight gradient, encoder weight gradient). Here the encoder's pre-activations are computed
densely once without autograd (the selection needs them all); the selected values are then
re-attached to the graph with `gather_pre`, whose backward touches only the selected
entries, and `sparse_decode` multiplies a CSR matrix of the selected activations with the
decoder. Gradients equal the dense formulation's up to float rounding.

A selection is given by coordinates ``rows, cols`` (1-D, same length) in row-major order:
rows ascending and, within a row, columns ascending (`select_per_row`, `select_flat`).
"""

from __future__ import annotations

import warnings

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _crow(major: Tensor, n_major: int) -> Tensor:
    crow = torch.zeros(n_major + 1, dtype=torch.long, device=major.device)
    crow[1:] = torch.bincount(major, minlength=n_major).cumsum(0)
    return crow


def _by_row(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return _csr(_crow(rows, shape[0]), cols, values, shape)


def _by_col(rows: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """The transpose ``[n_cols, n_rows]`` as CSR, ordered with a stable argsort (a general
    sparse coalesce sorts far more slowly)."""
    order = cols.argsort(stable=True)
    return _csr(_crow(cols, shape[1]), rows[order], values[order], (shape[1], shape[0]))


def _sorted_copy(indices: Tensor) -> Tensor:
    # The copy matters: sorting a view of topk's index output takes a path ~1000x slower on CPU.
    return indices.clone().sort(dim=-1).values


def select_per_row(indices: Int[Tensor, "batch k"]) -> tuple[Int[Tensor, " active"], Int[Tensor, " active"]]:
    """Coordinates of ``indices [rows, m]`` (m latents per row, e.g. from ``topk``), row-major.

    Example:
        >>> select_per_row(torch.tensor([[3, 1], [0, 2]]))
        (tensor([0, 0, 1, 1]), tensor([1, 3, 0, 2]))
    """
    n_rows, per_row = indices.shape
    rows = torch.arange(n_rows, device=indices.device).repeat_interleave(per_row)
    return rows, _sorted_copy(indices).reshape(-1)


def select_flat(
    flat_indices: Int[Tensor, " active"], d_sae: int
) -> tuple[Int[Tensor, " active"], Int[Tensor, " active"]]:
    """Coordinates of indices into a flattened ``[rows, d_sae]`` matrix (BatchTopK), row-major.

    Example:
        >>> select_flat(torch.tensor([5, 0, 3]), 4)
        (tensor([0, 0, 1]), tensor([0, 3, 1]))
    """
    flat = _sorted_copy(flat_indices)
    return flat // d_sae, flat % d_sae


class _GatherPre(torch.autograd.Function):
    """``pre[rows, cols]`` where ``pre = (x - b_dec) @ W_enc + b_enc``, with a sparse backward.

    ``x`` is data (no gradient); ``b_dec`` is ``None`` when the SAE does not subtract it.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre, rows, cols):
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, b_dec, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        # Summed over tokens, the gradient of pre is the gradient of b_enc; b_dec's follows from it.
        per_latent = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        grad_w = grad_b_dec = None
        if ctx.needs_input_grad[1]:
            x_in = x if b_dec is None else x - b_dec
            grad_w = (_by_col(rows, cols, grad, (x.shape[0], d_sae)) @ x_in).T.contiguous()
        if b_dec is not None and ctx.needs_input_grad[3]:
            grad_b_dec = -(W_enc @ per_latent)
        grad_b = per_latent if ctx.needs_input_grad[2] else None
        return None, grad_w, grad_b, grad_b_dec, None, None, None


def gather_pre(
    x: Float[Tensor, "batch d_in"],
    W_enc: Float[Tensor, "d_in d_sae"],
    b_enc: Float[Tensor, " d_sae"],
    b_dec: Float[Tensor, " d_in"] | None,
    pre: Float[Tensor, "batch d_sae"],
    rows: Int[Tensor, " active"],
    cols: Int[Tensor, " active"],
) -> Float[Tensor, " active"]:
    """Differentiable values ``pre[rows, cols]`` of the encoder's pre-activations.

    ``pre`` must equal ``(x - b_dec) @ W_enc + b_enc`` (``x`` itself when ``b_dec`` is None),
    computed without autograd by the caller; gradients flow to ``W_enc``, ``b_enc`` and
    ``b_dec`` through the selected entries only (``x`` is treated as data).

    Example:
        >>> x, W, b = torch.randn(4, 3), torch.randn(3, 6, requires_grad=True), torch.zeros(6, requires_grad=True)
        >>> pre = (x @ W + b).detach(); idx = pre.topk(2).indices
        >>> rows, cols = select_per_row(idx)
        >>> gather_pre(x, W, b, None, pre, rows, cols).sum().backward()
        >>> torch.allclose(W.grad, x.T @ torch.zeros(4, 6).scatter(-1, idx, 1.0))
        True
    """
    return _GatherPre.apply(x, W_enc, b_enc, b_dec, pre, rows, cols)


class _SparseDecode(torch.autograd.Function):
    """``A @ W_dec`` for the sparse activation matrix ``A`` given by coordinates and values."""

    @staticmethod
    def forward(ctx, values, rows, cols, W_dec, n_rows):
        ctx.save_for_backward(values, rows, cols, W_dec)
        ctx.n_rows = n_rows
        return _by_row(rows, cols, values, (n_rows, W_dec.shape[0])) @ W_dec

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, rows, cols, W_dec = ctx.saved_tensors
        shape = (ctx.n_rows, W_dec.shape[0])
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            pattern = _by_row(rows, cols, torch.ones_like(values), shape)
            grad_values = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.T, beta=0.0).values()
        if ctx.needs_input_grad[3]:
            grad_w = _by_col(rows, cols, values, shape) @ grad_out
        return grad_values, None, None, grad_w, None


def sparse_decode(
    values: Float[Tensor, " active"],
    rows: Int[Tensor, " active"],
    cols: Int[Tensor, " active"],
    W_dec: Float[Tensor, "d_sae d_out"],
    n_rows: int,
) -> Float[Tensor, "batch d_out"]:
    """``[n_rows, d_out]``: row ``r`` is ``sum values[i] * W_dec[cols[i]]`` over ``rows[i] == r``.

    Example:
        >>> W = torch.randn(6, 3)
        >>> out = sparse_decode(torch.tensor([2.0, -1.0]), torch.tensor([0, 0]), torch.tensor([0, 4]), W, 2)
        >>> torch.allclose(out[0], 2 * W[0] - W[4]), out[1].abs().sum().item()
        (True, 0.0)
    """
    return _SparseDecode.apply(values, rows, cols, W_dec, n_rows)


def dense_from_sparse(
    values: Float[Tensor, " active"], rows: Int[Tensor, " active"], cols: Int[Tensor, " active"], shape: tuple[int, int]
) -> Float[Tensor, "batch d_sae"]:
    """The dense ``shape`` matrix with ``values`` at ``(rows, cols)`` and zeros elsewhere.

    Example:
        >>> dense_from_sparse(torch.tensor([2.0, 3.0]), torch.tensor([0, 1]), torch.tensor([2, 0]), (2, 3)).tolist()
        [[0.0, 0.0, 2.0], [3.0, 0.0, 0.0]]
    """
    return torch.zeros(shape, dtype=values.dtype, device=values.device).index_put_((rows, cols), values)

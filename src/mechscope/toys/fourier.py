"""Fourier tools for modular arithmetic over ``Z_p``.

The Fourier basis of functions on ``{0, ..., p-1}`` has one constant vector and, for each
frequency ``k = 1 ... p // 2``, the vectors ``cos(2 pi k x / p)`` and ``sin(2 pi k x / p)``,
each scaled to unit norm (for even ``p`` the frequency ``p / 2`` has only its cosine). The
2-D basis over pairs ``(a, b)`` is the outer product of two 1-D bases. A network that has
learned modular addition with a few *key frequencies* is sparse in these bases: its embedding
uses only those frequencies and each MLP neuron is explained by one of them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError


def fourier_basis(p: int, *, dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, list[str]]:
    """The orthonormal Fourier basis of ``Z_p``: a ``[p, p]`` matrix whose rows are basis vectors.

    Row 0 is the constant vector; rows ``2k - 1`` and ``2k`` are ``cos`` and ``sin`` of
    frequency ``k``. Returns the matrix and a label per row.

    Example:
        >>> basis, labels = fourier_basis(5)
        >>> labels
        ['const', 'cos 1', 'sin 1', 'cos 2', 'sin 2']
        >>> torch.allclose(basis @ basis.T, torch.eye(5), atol=1e-6)
        True
    """
    if p < 2:
        raise InputError(f"the modulus p must be at least 2, got {p}")
    x = torch.arange(p, dtype=torch.float64)
    rows, labels = [torch.ones(p, dtype=torch.float64)], ["const"]
    for k in range(1, p // 2 + 1):
        rows.append(torch.cos(2 * math.pi * k * x / p))
        labels.append(f"cos {k}")
        if 2 * k != p:
            rows.append(torch.sin(2 * math.pi * k * x / p))
            labels.append(f"sin {k}")
    basis = torch.stack(rows)
    basis = basis / basis.norm(dim=1, keepdim=True)
    return basis.to(dtype=dtype, device=device), labels


def n_frequencies(p: int) -> int:
    """Number of non-constant frequencies of ``Z_p`` (``p // 2``).

    Example:
        >>> n_frequencies(113)
        56
    """
    return p // 2


def frequency_indices(p: int, k: int) -> list[int]:
    """Rows of `fourier_basis` that belong to frequency ``k`` (``cos`` and, unless ``2k = p``, ``sin``).

    Example:
        >>> frequency_indices(7, 2), frequency_indices(6, 3)
        ([3, 4], [5])
    """
    if not 1 <= k <= p // 2:
        raise InputError(f"frequency {k} is out of range for p={p}; valid frequencies are 1 ... {p // 2}")
    return [2 * k - 1] if 2 * k == p else [2 * k - 1, 2 * k]


def fourier_1d(x: Tensor, dim: int = 0) -> Tensor:
    """Coefficients of ``x`` in the Fourier basis along ``dim`` (whose size is ``p``).

    Example:
        >>> x = torch.randn(7, 3)
        >>> coeffs = fourier_1d(x)
        >>> torch.allclose(coeffs.norm(), x.norm(), atol=1e-5)  # orthonormal: norms are kept
        True
    """
    basis, _ = fourier_basis(x.shape[dim], dtype=x.dtype, device=x.device)
    return torch.movedim(torch.tensordot(basis, torch.movedim(x, dim, 0), dims=1), 0, dim)


def fourier_2d(x: Float[Tensor, "p p ..."]) -> Float[Tensor, "p p ..."]:
    """Coefficients of ``x`` (indexed by ``(a, b)`` in its first two dimensions) in the 2-D basis.

    Entry ``[i, j]`` is the coefficient of ``basis[i](a) * basis[j](b)``.

    Example:
        >>> basis, _ = fourier_basis(5)
        >>> x = torch.outer(basis[3], basis[2])  # cos 2 (a) * sin 1 (b)
        >>> coeffs = fourier_2d(x)
        >>> coeffs[3, 2].item() > 0.999, coeffs.abs().sum().item() < 1.001
        (True, True)
    """
    if x.dim() < 2 or x.shape[0] != x.shape[1]:
        raise InputError(f"fourier_2d needs a [p, p, ...] tensor, got shape {tuple(x.shape)}")
    return fourier_1d(fourier_1d(x, dim=0), dim=1)


def frequency_norms(x: Tensor, dim: int = 0) -> Float[Tensor, " freq"]:
    """Squared norm of ``x``'s Fourier coefficients per frequency ``k = 1 ... p // 2`` (index ``k - 1``).

    The constant component is left out. Use it on the embedding ``W_E[:p]`` to see which
    frequencies the model represents.

    Example:
        >>> basis, _ = fourier_basis(7)
        >>> frequency_norms(2 * basis[5] + basis[0]).round(decimals=4)  # cos 3, plus a constant
        tensor([0., 0., 4.])
    """
    p = x.shape[dim]
    coeffs = torch.movedim(fourier_1d(x, dim), dim, 0).reshape(p, -1).pow(2).sum(-1)
    return torch.stack([coeffs[frequency_indices(p, k)].sum() for k in range(1, p // 2 + 1)])


def key_frequencies_from_embedding(W_E: Float[Tensor, "p d_model"], threshold: float = 0.1) -> list[int]:
    """Frequencies that carry a large share of the embedding's squared norm.

    A frequency ``k`` is key when its squared norm is at least ``threshold`` times that of the
    strongest frequency. Pass the embedding rows of the ``p`` numbers only (not the ``=`` token).

    Example:
        >>> basis, _ = fourier_basis(11)
        >>> W_E = torch.outer(basis[3], torch.randn(8)) + torch.outer(basis[8], torch.randn(8))
        >>> key_frequencies_from_embedding(W_E)  # rows 3 and 8 are cos 2 and sin 4
        [2, 4]
    """
    norms = frequency_norms(W_E, dim=0)
    return [k + 1 for k in torch.nonzero(norms >= threshold * norms.max()).flatten().tolist()]


def neuron_frequency_fractions(acts: Float[Tensor, "p p d_mlp"]) -> Float[Tensor, "freq d_mlp"]:
    """Fraction of each neuron's variance over the ``(a, b)`` grid explained by each frequency.

    Frequency ``k`` explains the 2-D Fourier terms built from ``{const, cos k, sin k}`` in both
    ``a`` and ``b`` (the constant-constant term excluded); the variance is everything but that
    term. Row ``k - 1`` is frequency ``k``.

    Example:
        >>> basis, _ = fourier_basis(7)
        >>> neuron = torch.outer(basis[3], basis[4])[..., None]  # cos 2 (a) * sin 2 (b)
        >>> neuron_frequency_fractions(neuron)[:, 0].round(decimals=4)
        tensor([0., 1., 0.])
    """
    p = acts.shape[0]
    coeffs = fourier_2d(acts).pow(2)  # [p, p, d_mlp]
    coeffs[0, 0] = 0
    total = coeffs.sum((0, 1)).clamp_min(torch.finfo(acts.dtype).tiny)
    rows = []
    for k in range(1, p // 2 + 1):
        idx = [0, *frequency_indices(p, k)]
        rows.append(coeffs[idx][:, idx].sum((0, 1)) / total)
    return torch.stack(rows)


def neuron_frequencies(acts: Float[Tensor, "p p d_mlp"]) -> tuple[list[int], Float[Tensor, " d_mlp"]]:
    """Each neuron's dominant frequency and the fraction of its variance that frequency explains.

    Example:
        >>> basis, _ = fourier_basis(7)
        >>> acts = torch.stack([torch.outer(basis[1], basis[0]), torch.outer(basis[5], basis[6])], -1)
        >>> freqs, frac = neuron_frequencies(acts)
        >>> freqs, frac.tolist()
        ([1, 3], [1.0, 1.0])
    """
    fractions = neuron_frequency_fractions(acts)
    frac, index = fractions.max(0)
    return [i + 1 for i in index.tolist()], frac


def key_frequencies_from_neurons(
    acts: Float[Tensor, "p p d_mlp"], min_fraction: float = 0.5, min_neurons: int | None = None
) -> list[int]:
    """Frequencies that explain at least ``min_fraction`` of the variance of at least ``min_neurons`` neurons.

    ``min_neurons`` defaults to 1% of the neurons (at least 2). Neurons that are constant over the
    grid (dead) count for no frequency.

    Example:
        >>> basis, _ = fourier_basis(11)
        >>> acts = torch.stack([torch.outer(basis[7], basis[0])] * 3 + [torch.outer(basis[2], basis[2])] * 3, -1)
        >>> key_frequencies_from_neurons(acts)
        [1, 4]
    """
    if min_neurons is None:
        min_neurons = max(2, acts.shape[-1] // 100)
    freqs, frac = neuron_frequencies(acts)
    counts: dict[int, int] = {}
    for k, f in zip(freqs, frac.tolist()):
        if f >= min_fraction:
            counts[k] = counts.get(k, 0) + 1
    return sorted(k for k, n in counts.items() if n >= min_neurons)


def sum_directions(p: int, freqs: list[int], *, dtype=torch.float32, device=None) -> Float[Tensor, "pair direction"]:
    """Unit vectors over the ``p * p`` pairs (``a``-major) along ``cos(w_k (a + b))`` and ``sin(w_k (a + b))``.

    These are the directions a model that computes ``a + b mod p`` with frequency ``k`` uses.
    Returns ``[p * p, 2 * len(freqs)]`` (only the cosine for ``2k = p``); the columns are orthonormal.

    Example:
        >>> d = sum_directions(7, [1, 3])
        >>> d.shape, torch.allclose(d.T @ d, torch.eye(4), atol=1e-6)
        (torch.Size([49, 4]), True)
    """
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    columns = []
    for k in freqs:
        frequency_indices(p, k)  # validates k
        w = 2 * math.pi * k / p
        columns.append(torch.cos(w * (a + b)).flatten())
        if 2 * k != p:
            columns.append(torch.sin(w * (a + b)).flatten())
    directions = torch.stack(columns, -1) if columns else torch.zeros(p * p, 0, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    return directions.to(dtype=dtype, device=device)


def restricted_logits(
    neuron_acts: Float[Tensor, "pair d_mlp"],
    W_logit: Float[Tensor, "d_mlp d_vocab_out"],
    logits: Float[Tensor, "pair d_vocab_out"],
    key_freqs: list[int],
    p: int,
) -> Float[Tensor, "pair d_vocab_out"]:
    """Logits computed from the neurons' key-frequency components only.

    Over all ``p * p`` pairs (``a``-major), each neuron's activations are replaced by their mean
    plus their projection on the `sum_directions` of ``key_freqs``; these go through
    ``W_logit = W_out @ W_U``, and the mean logit per output is set to that of ``logits`` (which
    absorbs the direct and attention paths' constant parts). The *restricted loss* of the
    progress-measures paper is the loss of these logits.

    Example:
        >>> acts = sum_directions(7, [1, 3]) @ torch.randn(4, 6)  # neurons using frequencies 1 and 3
        >>> W_logit = torch.randn(6, 7)
        >>> logits = acts @ W_logit
        >>> torch.allclose(restricted_logits(acts, W_logit, logits, [1, 3], p=7), logits, atol=1e-5)
        True
        >>> torch.allclose(restricted_logits(acts, W_logit, logits, [2], p=7), logits, atol=1e-5)
        False
    """
    directions = sum_directions(p, key_freqs, dtype=neuron_acts.dtype, device=neuron_acts.device)
    mean = neuron_acts.mean(0, keepdim=True)
    approx = mean + directions @ (directions.T @ (neuron_acts - mean))
    out = approx @ W_logit
    return out + logits.mean(0, keepdim=True) - out.mean(0, keepdim=True)


def excluded_logits(logits: Float[Tensor, "pair d_vocab_out"], key_freqs: list[int], p: int) -> Tensor:
    """``logits`` over all ``p * p`` pairs with their ``cos/sin(w_k (a + b))`` components removed.

    For each output, the projection of its logits (as a function of the pair) onto the
    `sum_directions` of ``key_freqs`` is subtracted. The *excluded loss* is the training loss of
    these logits: it rises as the model comes to depend on the key frequencies.

    Example:
        >>> p, k = 7, 2
        >>> a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
        >>> logits = torch.cos(2 * torch.pi * k * (a + b - c) / p).reshape(p * p, p)
        >>> excluded_logits(logits, [k], p).abs().max().item() < 1e-5
        True
    """
    directions = sum_directions(p, key_freqs, dtype=logits.dtype, device=logits.device)
    return logits - directions @ (directions.T @ logits)


def modular_loss(logits: Float[Tensor, "pair d_vocab_out"], labels: Tensor) -> Tensor:
    """Mean cross-entropy in float64 (the losses of a grokked model go below float32's resolution).

    Example:
        >>> modular_loss(torch.zeros(2, 4), torch.tensor([0, 3])).item() == math.log(4)
        True
    """
    return F.cross_entropy(logits.double(), labels)

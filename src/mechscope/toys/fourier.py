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

from mechscope.errors import ConfigError, InputError
from mechscope.names import closest_names


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


KEY_FREQUENCY_RULES = ("gap", "threshold")
"""How key frequencies are chosen from per-frequency norms; ``"gap"`` is the default.

``"gap"`` (`gap_key_frequencies`): sort the norms and cut at the largest ratio between
neighbours among the strongest ``max_keys``; ``"threshold"`` (`threshold_key_frequencies`): every
frequency at least ``threshold`` times the strongest. The gap rule needs no scale: it finds the
drop that a grokked model's spectrum shows, where a fixed threshold also counts the strongest
noise frequencies (a model with five frequencies at 15% of the norm each and noise frequencies
at 2.5%, 2.1% and 1.7% has eight above 0.1 times the strongest).
"""


_GAP_OPTIONS = ("max_keys", "min_ratio", "floor")


def _check_rule(rule: str, options: dict[str, object], valid: dict[str, tuple[str, ...]]) -> None:
    """Raise unless ``rule`` is one of ``valid`` and every option given (not ``None``) belongs to it."""
    if rule not in valid:
        close = closest_names(str(rule), valid)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown key-frequency rule {rule!r}; valid rules are {list(valid)}{hint}")
    wrong = [name for name, value in options.items() if value is not None and name not in valid[rule]]
    if wrong:
        owner = next(r for r, names in valid.items() if wrong[0] in names)
        raise ConfigError(
            f"{wrong[0]} is an option of rule={owner!r}, not of rule={rule!r}; rule={rule!r} takes {list(valid[rule])}"
        )


def gap_key_frequencies(
    norms: Float[Tensor, " freq"], max_keys: int = 15, min_ratio: float = 2.0, floor: float = 1e-3
) -> list[int]:
    """Key frequencies at the largest drop of the sorted per-frequency norms (index ``k - 1`` is ``k``).

    The norms are sorted in decreasing order, ``s_1 >= s_2 >= ...``, and the cut goes after the
    ``i`` (``1 <= i <= max_keys``, at least one frequency left out) with the largest ratio
    ``s_i / (s_{i+1} + floor * s_1)``; the ``i`` strongest frequencies are key. The ``floor``
    term makes everything below a thousandth of the strongest norm equally negligible, so that
    a small but real frequency above round-off zeros (a clean, constructed spectrum) is not
    mistaken for the gap; with any noise in the spectrum it changes nothing. If that largest
    ratio is below
    ``min_ratio`` the spectrum has no gap (an untrained model, or one spread over many
    frequencies) and no frequency is key; with more than ``max_keys`` key frequencies the gap is
    out of reach and the result is usually empty too. A frequency much stronger than the other
    key frequencies (a larger ratio to them than theirs to the rest) is returned alone.

    Noise levels (``tests/toys/test_fourier.py``): on planted embeddings with ``p = 113``,
    ``d_model = 128``, five frequencies of equal norm ``s`` and i.i.d. Gaussian noise of
    expected norm ``nu * s`` per frequency, the rule returned exactly the planted frequencies
    for all of 200 seeds at every ``nu`` up to 0.45 (197 at 0.5); past that it returns no
    frequency rather than a wrong set (every seed at 0.8). The threshold rule at 0.1 was exact
    for all 200 seeds up to ``nu = 0.08``, for 33 at 0.1 and for none from 0.15. With the five
    norms spread over a factor of three (``s`` to ``s / 3``) the gap rule stays exact up to
    ``nu = 0.15`` (noise relative to the strongest).

    Example:
        >>> gap_key_frequencies(torch.tensor([0.2, 5.0, 0.3, 4.0, 0.1, 1.0]))  # 5, 4 | 1, 0.3, ...
        [2, 4]
        >>> gap_key_frequencies(torch.tensor([1.0, 1.2, 0.9, 1.1]))  # no gap: nothing stands out
        []
    """
    if norms.dim() != 1:
        raise InputError(f"norms must be one value per frequency (1-D), got shape {tuple(norms.shape)}")
    if max_keys < 1:
        raise ConfigError(f"max_keys must be at least 1, got {max_keys}")
    if min_ratio < 1:
        raise ConfigError(f"min_ratio must be at least 1 (a ratio of sorted norms), got {min_ratio}")
    if not 0 <= floor < 1:
        raise ConfigError(f"floor must be in [0, 1) (a fraction of the strongest norm), got {floor}")
    values, order = norms.detach().double().sort(descending=True)
    n_cuts = min(max_keys, len(values) - 1)
    if n_cuts < 1 or not values[0] > 0:
        return []
    below = (values[1 : n_cuts + 1] + floor * values[0]).clamp_min(torch.finfo(torch.float64).tiny)
    ratios = values[:n_cuts] / below
    best = int(ratios.argmax())
    if not ratios[best] >= min_ratio:
        return []
    return sorted(k + 1 for k in order[: best + 1].tolist())


def threshold_key_frequencies(norms: Float[Tensor, " freq"], threshold: float = 0.1) -> list[int]:
    """Frequencies whose norm is at least ``threshold`` times the strongest (index ``k - 1`` is ``k``).

    Example:
        >>> threshold_key_frequencies(torch.tensor([0.2, 5.0, 0.3, 4.0, 0.1, 1.0]))
        [2, 4, 6]
    """
    if norms.dim() != 1:
        raise InputError(f"norms must be one value per frequency (1-D), got shape {tuple(norms.shape)}")
    return [k + 1 for k in torch.nonzero(norms >= threshold * norms.max()).flatten().tolist()]


def key_frequencies_from_norms(
    norms: Float[Tensor, " freq"],
    *,
    rule: str = "gap",
    max_keys: int | None = None,
    min_ratio: float | None = None,
    floor: float | None = None,
    threshold: float | None = None,
) -> list[int]:
    """Key frequencies from per-frequency norms by ``rule`` (see `KEY_FREQUENCY_RULES`).

    ``max_keys`` (default 15), ``min_ratio`` (default 2) and ``floor`` (default 1e-3) are
    options of ``rule="gap"`` (`gap_key_frequencies`); ``threshold`` (default 0.1) of ``rule="threshold"``
    (`threshold_key_frequencies`). Giving an option of the other rule is an error.

    Example:
        >>> norms = torch.tensor([15.4, 2.5, 15.0, 0.4, 14.8, 2.1, 15.2, 1.7, 14.5, 0.3])
        >>> key_frequencies_from_norms(norms), key_frequencies_from_norms(norms, rule="threshold")
        ([1, 3, 5, 7, 9], [1, 2, 3, 5, 6, 7, 8, 9])
    """
    _check_rule(
        rule,
        {"max_keys": max_keys, "min_ratio": min_ratio, "floor": floor, "threshold": threshold},
        {"gap": _GAP_OPTIONS, "threshold": ("threshold",)},
    )
    if rule == "threshold":
        return threshold_key_frequencies(norms, 0.1 if threshold is None else threshold)
    gap = {"max_keys": max_keys, "min_ratio": min_ratio, "floor": floor}
    return gap_key_frequencies(norms, **{name: value for name, value in gap.items() if value is not None})


def key_frequencies_from_embedding(
    W_E: Float[Tensor, "p d_model"],
    *,
    rule: str = "gap",
    max_keys: int | None = None,
    min_ratio: float | None = None,
    floor: float | None = None,
    threshold: float | None = None,
) -> list[int]:
    """Frequencies that carry the embedding's norm: `key_frequencies_from_norms` of its `frequency_norms`.

    By default (``rule="gap"``) the key frequencies are those above the largest drop of the
    sorted per-frequency norms; ``rule="threshold"`` keeps every frequency with at least
    ``threshold`` (default 0.1) times the strongest one's norm. Pass the embedding rows of the
    ``p`` numbers only (not the ``=`` token).

    Example:
        >>> basis, _ = fourier_basis(11)
        >>> W_E = torch.outer(basis[3], torch.randn(8)) + torch.outer(basis[8], torch.randn(8))
        >>> key_frequencies_from_embedding(W_E)  # rows 3 and 8 are cos 2 and sin 4
        [2, 4]
    """
    return key_frequencies_from_norms(
        frequency_norms(W_E, dim=0), rule=rule, max_keys=max_keys, min_ratio=min_ratio, floor=floor, threshold=threshold
    )


def neuron_frequency_fractions(acts: Float[Tensor, "p p d_mlp"]) -> Float[Tensor, "freq d_mlp"]:
    """Fraction of each neuron's variance over the ``(a, b)`` grid explained by each frequency.

    Frequency ``k`` explains the 2-D Fourier terms built from ``{const, cos k, sin k}`` in both
    ``a`` and ``b`` (the constant-constant term excluded); the variance is everything but that
    term. Row ``k - 1`` is frequency ``k``. A neuron that is constant over the grid (dead, or
    varying by less than the dtype's resolution: variance at most ``eps`` times its mean square)
    has fraction 0 for every frequency.

    Example:
        >>> basis, _ = fourier_basis(7)
        >>> neuron = torch.outer(basis[3], basis[4])[..., None]  # cos 2 (a) * sin 2 (b)
        >>> neuron_frequency_fractions(neuron)[:, 0].round(decimals=4)
        tensor([0., 1., 0.])
    """
    p = acts.shape[0]
    coeffs = fourier_2d(acts).pow(2)  # [p, p, d_mlp]
    mean_square = coeffs.sum((0, 1))
    coeffs[0, 0] = 0
    total = coeffs.sum((0, 1))
    constant = total <= torch.finfo(acts.dtype).eps * mean_square
    total = torch.where(constant, torch.inf, total.clamp_min(torch.finfo(acts.dtype).tiny))
    rows = []
    for k in range(1, p // 2 + 1):
        idx = [0, *frequency_indices(p, k)]
        rows.append(coeffs[idx][:, idx].sum((0, 1)) / total)
    return torch.stack(rows)


def neurons_per_frequency(acts: Float[Tensor, "p p d_mlp"]) -> Float[Tensor, " freq"]:
    """How many neurons each frequency explains: `neuron_frequency_fractions` summed over neurons.

    Each neuron counts once, split between frequencies by the fraction of its variance each
    explains, whatever its scale (in a grokked model a frequency's neurons can have a tenth of
    the variance of another's and still be used); constant (dead) neurons count for nothing.
    Entry ``k - 1`` is frequency ``k``. This is what `key_frequencies_from_neurons` cuts by
    default.

    Example:
        >>> basis, _ = fourier_basis(7)
        >>> acts = torch.stack([3 * torch.outer(basis[1], basis[0]), torch.outer(basis[5], basis[6])], -1)
        >>> neurons_per_frequency(acts).round(decimals=4)  # one neuron on frequency 1, one on 3
        tensor([1., 0., 1.])
    """
    return neuron_frequency_fractions(acts).sum(-1)


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
    acts: Float[Tensor, "p p d_mlp"],
    *,
    rule: str = "gap",
    max_keys: int | None = None,
    min_ratio: float | None = None,
    floor: float | None = None,
    min_fraction: float | None = None,
    min_neurons: int | None = None,
) -> list[int]:
    """The frequencies the neurons use.

    ``rule="gap"`` (default): `gap_key_frequencies` of `neurons_per_frequency` (each neuron
    counted once, split between frequencies by the variance fraction each explains), with its
    options ``max_keys``, ``min_ratio`` and ``floor``. ``rule="threshold"``: frequencies that
    explain at least ``min_fraction`` (default 0.5) of the variance of at least ``min_neurons``
    neurons (default 1% of the neurons, at least 2). Dead neurons count for no frequency under
    either rule. Giving an option of the other rule is an error.

    Noise level (``tests/toys/test_fourier.py``): with ``p = 113`` and 512 neurons on five key
    frequencies, each neuron also carrying a random other frequency with ``nu`` times its key's
    variance, the gap rule returned exactly the key frequencies for 20 of 20 seeds up to
    ``nu = 2`` (and no frequency for most seeds at 3); the threshold rule fails from ``nu = 1``,
    where many neurons are dominated by their other frequency.

    Example:
        >>> basis, _ = fourier_basis(11)
        >>> acts = torch.stack([torch.outer(basis[7], basis[0])] * 3 + [torch.outer(basis[2], basis[2])] * 3, -1)
        >>> key_frequencies_from_neurons(acts), key_frequencies_from_neurons(acts, rule="threshold")
        ([1, 4], [1, 4])
    """
    _check_rule(
        rule,
        {
            "max_keys": max_keys,
            "min_ratio": min_ratio,
            "floor": floor,
            "min_fraction": min_fraction,
            "min_neurons": min_neurons,
        },
        {"gap": _GAP_OPTIONS, "threshold": ("min_fraction", "min_neurons")},
    )
    if rule == "gap":
        return key_frequencies_from_norms(
            neurons_per_frequency(acts), max_keys=max_keys, min_ratio=min_ratio, floor=floor
        )
    min_fraction = 0.5 if min_fraction is None else min_fraction
    if min_neurons is None:
        min_neurons = max(2, acts.shape[-1] // 100)
    freqs, frac = neuron_frequencies(acts)
    counts: dict[int, int] = {}
    for k, f in zip(freqs, frac.tolist(), strict=True):
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

"""Fourier basis, frequency detection, restricted and excluded loss against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import InputError
from mechscope.toys import fourier


@pytest.mark.parametrize("p", [5, 12, 113])
def test_basis_is_orthonormal_and_matches_formula(p):
    basis, labels = fourier.fourier_basis(p, dtype=torch.float64)
    assert basis.shape == (p, p) and len(labels) == p
    assert_close(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.arange(p, dtype=torch.float64)
    for row, label in zip(basis, labels):
        if label == "const":
            expected = torch.ones(p, dtype=torch.float64)
        else:
            kind, k = label.split()
            expected = (torch.cos if kind == "cos" else torch.sin)(2 * math.pi * int(k) * x / p)
        assert_close(row, expected / expected.norm(), atol=1e-12, rtol=0)


def test_fourier_1d_and_2d_invert_with_the_transpose():
    p = 9
    basis, _ = fourier.fourier_basis(p, dtype=torch.float64)
    x = torch.randn(p, p, 3, dtype=torch.float64)
    coeffs = fourier.fourier_2d(x)
    assert_close(torch.einsum("ia,jb,ijn->abn", basis, basis, coeffs), x)
    assert_close(fourier.fourier_1d(x, dim=1), torch.einsum("jb,abn->ajn", basis, x))
    with pytest.raises(InputError, match=r"\[p, p"):
        fourier.fourier_2d(torch.zeros(3, 4))


def test_frequency_norms_and_key_frequencies_from_embedding():
    p = 13
    basis, _ = fourier.fourier_basis(p)
    directions = torch.randn(4, 16)
    W_E = 3 * torch.outer(basis[5], directions[0]) + 2 * torch.outer(basis[10], directions[1])  # cos 3, sin 5
    W_E = W_E + 0.01 * torch.outer(basis[1], directions[2]) + 5 * torch.outer(basis[0], directions[3])
    norms = fourier.frequency_norms(W_E)
    expected = torch.zeros(p // 2)
    expected[2] = 9 * directions[0].pow(2).sum()
    expected[4] = 4 * directions[1].pow(2).sum()
    expected[0] = 1e-4 * directions[2].pow(2).sum()
    assert_close(norms, expected, atol=1e-4, rtol=1e-4)
    assert fourier.key_frequencies_from_embedding(W_E) == [3, 5]


def _naive_fraction(acts_2d: torch.Tensor, k: int) -> float:
    """Variance fraction by least squares on the 9 functions of (a, b) built from {1, cos k, sin k}."""
    p = acts_2d.shape[0]
    a = torch.arange(p, dtype=torch.float64)[:, None].expand(p, p)
    b = torch.arange(p, dtype=torch.float64)[None, :].expand(p, p)
    w = 2 * math.pi * k / p
    one = [torch.ones_like(a)]
    fa = one + [torch.cos(w * a), torch.sin(w * a)]
    fb = one + [torch.cos(w * b), torch.sin(w * b)]
    design = torch.stack([(u * v).flatten() for u in fa for v in fb], -1)
    y = acts_2d.flatten().double()
    solution = torch.linalg.lstsq(design, y[:, None]).solution
    fitted = (design @ solution)[:, 0]
    centred = y - y.mean()
    return float(((fitted - y.mean()).pow(2).sum()) / centred.pow(2).sum())


def test_neuron_frequency_fractions_match_least_squares():
    p = 11
    torch.manual_seed(0)
    a = torch.arange(p, dtype=torch.float64)[:, None]
    b = torch.arange(p, dtype=torch.float64)[None, :]
    w3 = 2 * math.pi * 3 / p
    acts = torch.stack(
        [
            torch.relu(torch.cos(w3 * (a + b)) + 0.3),  # mostly frequency 3, with harmonics
            torch.cos(w3 * a) * torch.sin(w3 * b) + 0.1 * torch.randn(p, p, dtype=torch.float64),
            torch.randn(p, p, dtype=torch.float64),
        ],
        -1,
    )
    fractions = fourier.neuron_frequency_fractions(acts)
    for neuron in range(3):
        for k in (1, 3, 5):
            assert fractions[k - 1, neuron].item() == pytest.approx(_naive_fraction(acts[..., neuron], k), abs=1e-9)
    freqs, frac = fourier.neuron_frequencies(acts)
    assert freqs[:2] == [3, 3] and frac[1] > 0.95
    assert fourier.key_frequencies_from_neurons(acts, min_fraction=0.6, min_neurons=2) == [3]


def test_sum_directions_are_orthonormal_cos_sin_of_a_plus_b():
    p = 9
    d = fourier.sum_directions(p, [2, 4], dtype=torch.float64)
    assert_close(d.T @ d, torch.eye(4, dtype=torch.float64))
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    cos2 = torch.cos(2 * math.pi * 2 * (a + b).double() / p).flatten()
    assert_close(d[:, 0], cos2 / cos2.norm())
    with pytest.raises(InputError, match="frequency 5 is out of range"):
        fourier.sum_directions(p, [5])


def _grid_logits(p: int, terms: dict[int, float]) -> torch.Tensor:
    a, b, c = torch.meshgrid(torch.arange(p), torch.arange(p), torch.arange(p), indexing="ij")
    logits = torch.zeros(p, p, p, dtype=torch.float64)
    for k, scale in terms.items():
        logits += scale * torch.cos(2 * math.pi * k * (a + b - c).double() / p)
    return logits.reshape(p * p, p)


def test_excluded_loss_on_constructed_logits():
    p = 13
    labels = (torch.arange(p).repeat_interleave(p) + torch.arange(p).repeat(p)) % p
    logits = _grid_logits(p, {2: 8.0, 5: 6.0})
    full = fourier.modular_loss(logits, labels).item()
    assert full < 0.05  # the constructed model is correct
    # Removing the key frequencies leaves nothing: uniform logits, loss log p.
    excluded = fourier.excluded_logits(logits, [2, 5], p)
    assert_close(excluded, torch.zeros_like(excluded), atol=1e-10, rtol=0)
    assert fourier.modular_loss(excluded, labels).item() == pytest.approx(math.log(p))
    # Removing one frequency leaves exactly the other one.
    assert_close(fourier.excluded_logits(logits, [2], p), _grid_logits(p, {5: 6.0}), atol=1e-10, rtol=0)


def test_restricted_loss_on_constructed_neurons():
    p = 13
    a = torch.arange(p, dtype=torch.float64).repeat_interleave(p)
    b = torch.arange(p, dtype=torch.float64).repeat(p)
    w = 2 * math.pi * 4 / p
    torch.manual_seed(0)
    noise = torch.randn(p * p, 6, dtype=torch.float64)
    # Six neurons: cos/sin of 4(a+b) with offsets, plus a bit of unrelated structure.
    key_part = torch.stack([torch.cos(w * (a + b)), torch.sin(w * (a + b))], -1) @ torch.randn(2, 6, dtype=torch.float64)
    acts = 2.0 + key_part + 0.2 * noise
    W_logit = torch.randn(6, p, dtype=torch.float64)
    logits = acts @ W_logit + torch.randn(p, dtype=torch.float64)  # a constant direct-path term
    restricted = fourier.restricted_logits(acts, W_logit, logits, [4], p)
    # Reference: least-squares projection of each neuron on span{1, cos 4(a+b), sin 4(a+b)}.
    design = torch.stack([torch.ones_like(a), torch.cos(w * (a + b)), torch.sin(w * (a + b))], -1)
    projected = design @ torch.linalg.lstsq(design, acts).solution
    expected = projected @ W_logit
    expected = expected + logits.mean(0) - expected.mean(0)
    assert_close(restricted, expected, atol=1e-9, rtol=1e-9)
    # Keeping no frequency leaves only the mean logits.
    assert_close(fourier.restricted_logits(acts, W_logit, logits, [], p), logits.mean(0).expand(p * p, p))

"""Fourier basis, frequency detection, restricted and excluded loss against direct formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import ConfigError, InputError
from mechscope.toys import fourier


@pytest.mark.parametrize("p", [5, 12, 113])
def test_basis_is_orthonormal_and_matches_formula(p):
    basis, labels = fourier.fourier_basis(p, dtype=torch.float64)
    assert basis.shape == (p, p) and len(labels) == p
    assert_close(basis @ basis.T, torch.eye(p, dtype=torch.float64), atol=1e-12, rtol=0)
    x = torch.arange(p, dtype=torch.float64)
    for row, label in zip(basis, labels, strict=True):
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


def _planted_keys(p: int, k: int, seed: int) -> list[int]:
    return sorted(torch.randperm(p // 2, generator=torch.Generator().manual_seed(seed))[:k].add(1).tolist())


def _planted_embedding(p: int, d_model: int, keys: list[int], nu: float, seed: int, norms=None) -> torch.Tensor:
    """``W_E`` whose frequency ``keys[i]`` has squared norm ``norms[i]`` (default 1) along random directions,
    plus i.i.d. Gaussian noise of expected squared norm ``nu`` per frequency (``2 * d_model`` coefficients)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = fourier.fourier_basis(p, dtype=torch.float64)
    W_E = torch.zeros(p, d_model, dtype=torch.float64)
    for key, norm in zip(keys, norms or [1.0] * len(keys), strict=True):
        for row in fourier.frequency_indices(p, key):
            u = torch.randn(d_model, generator=g, dtype=torch.float64)
            W_E += math.sqrt(norm / 2) * torch.outer(basis[row], u / u.norm())
    return W_E + math.sqrt(nu / (2 * d_model)) * torch.randn(p, d_model, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("nu", [0.0, 0.05, 0.1, 0.2, 0.3, 0.4])
def test_gap_rule_finds_exactly_the_planted_embedding_frequencies_up_to_noise_0_4(nu):
    """Five equal key frequencies, p = 113, d_model = 128, noise of expected norm ``nu`` x a key's per frequency.

    The stated level is nu = 0.4 (exact for 200 of 200 seeds up to 0.45, measured); five seeds here.
    """
    p = 113
    for seed in range(5):
        keys = _planted_keys(p, 5, seed)
        W_E = _planted_embedding(p, 128, keys, nu, seed)
        assert fourier.key_frequencies_from_embedding(W_E) == keys, (nu, seed)
        if nu >= 0.2:  # the old rule (0.1 x the strongest) already counts noise frequencies here
            old = fourier.key_frequencies_from_embedding(W_E, rule="threshold")
            assert set(old) > set(keys), (nu, seed, old)


def test_gap_rule_with_unequal_key_norms_and_past_its_noise_level():
    p = 113
    for seed in range(5):
        keys = _planted_keys(p, 5, seed)
        # Key norms spread over a factor of three: exact up to nu = 0.15 of the strongest (200 of 200 seeds).
        for nu in (0.05, 0.1, 0.15):
            W_E = _planted_embedding(p, 128, keys, nu, seed, norms=[1.0, 0.8, 0.6, 0.45, 0.33])
            assert fourier.key_frequencies_from_embedding(W_E) == keys, (nu, seed)
        # Noise of 0.8 x a key's norm per frequency: no gap left, and the rule says so instead of guessing.
        assert fourier.key_frequencies_from_embedding(_planted_embedding(p, 128, keys, 0.8, seed)) == []


def test_independent_model_shares_give_five_key_frequencies():
    """A p = 113 model trained outside the project (paper settings, grokked at epoch 7,400).

    Its embedding's per-frequency shares: five frequencies at 14.5-15.4% each, the next at 2.5%,
    2.1% and 1.7%, the other 48 sharing the remaining 18.8%. The paper's models have five key
    frequencies; the threshold rule (0.1 x the strongest) counts the three noise-level ones too.
    """
    shares = torch.zeros(56, dtype=torch.float64)
    keys = [14, 35, 41, 42, 52]
    shares[[k - 1 for k in keys]] = torch.tensor([15.4, 15.2, 15.0, 14.8, 14.5], dtype=torch.float64)
    shares[[k - 1 for k in (3, 20, 47)]] = torch.tensor([2.5, 2.1, 1.7], dtype=torch.float64)
    rest = [k for k in range(1, 57) if k not in keys + [3, 20, 47]]
    tail = torch.linspace(1.2, 0.1, len(rest), dtype=torch.float64)
    shares[[k - 1 for k in rest]] = tail * 18.8 / tail.sum()
    assert_close(shares.sum(), torch.tensor(100.0, dtype=torch.float64))
    assert fourier.key_frequencies_from_norms(shares) == keys
    assert fourier.key_frequencies_from_norms(shares, rule="threshold") == sorted(keys + [3, 20, 47])
    # The shares are a scale-free input: the rule is unchanged by scaling the norms.
    assert fourier.key_frequencies_from_norms(shares * 37.5) == keys


def test_gap_rule_edge_cases():
    assert fourier.gap_key_frequencies(torch.zeros(10)) == []
    assert fourier.gap_key_frequencies(torch.tensor([0.0, 3.0, 0.0])) == [2]  # exact zeros elsewhere
    assert fourier.gap_key_frequencies(torch.tensor([1.0, 1.5])) == []  # below min_ratio = 2
    assert fourier.gap_key_frequencies(torch.tensor([1.0, 1.5]), min_ratio=1.4) == [2]
    assert fourier.gap_key_frequencies(torch.tensor([4.0])) == []  # nothing to cut against
    # Twenty equal frequencies above noise: the gap is past max_keys = 15, so there is none to find.
    many = torch.cat([torch.ones(20), torch.full((30,), 0.01)])
    assert fourier.gap_key_frequencies(many) == []
    assert fourier.gap_key_frequencies(many, max_keys=25) == list(range(1, 21))
    with pytest.raises(InputError, match="1-D"):
        fourier.gap_key_frequencies(torch.ones(3, 2))
    with pytest.raises(ConfigError, match="min_ratio must be at least 1"):
        fourier.gap_key_frequencies(torch.ones(3), min_ratio=0.5)


def test_unknown_rule_and_options_of_the_other_rule_are_errors():
    norms = torch.tensor([5.0, 0.1, 4.0])
    with pytest.raises(ConfigError, match=r"unknown key-frequency rule 'gapp'.*\['gap', 'threshold'\].*'gap'"):
        fourier.key_frequencies_from_norms(norms, rule="gapp")
    with pytest.raises(ConfigError, match="threshold is an option of rule='threshold', not of rule='gap'"):
        fourier.key_frequencies_from_embedding(torch.randn(7, 4), threshold=0.2)
    with pytest.raises(ConfigError, match="min_fraction is an option of rule='threshold'"):
        fourier.key_frequencies_from_neurons(torch.randn(7, 7, 4), min_fraction=0.6)
    with pytest.raises(ConfigError, match="max_keys is an option of rule='gap'"):
        fourier.key_frequencies_from_neurons(torch.randn(7, 7, 4), rule="threshold", max_keys=5)
    assert fourier.key_frequencies_from_norms(norms, rule="threshold", threshold=0.5) == [1, 3]


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
    assert fourier.key_frequencies_from_neurons(acts, rule="threshold", min_fraction=0.6, min_neurons=2) == [3]


def _planted_neurons(p: int, d_mlp: int, keys: list[int], nu: float, seed: int, scales=None) -> torch.Tensor:
    """Neuron ``i`` is ``ReLU(cos(w_k a + phi) + cos(w_k b + psi))`` for key ``k = keys[i % len(keys)]``,
    plus a random non-key frequency ``cos(w_j (a + b) + chi)`` with ``nu`` times its variance, all times
    ``scales`` of that key."""
    g = torch.Generator().manual_seed(seed)
    a = torch.arange(p, dtype=torch.float64)[:, None, None]
    b = torch.arange(p, dtype=torch.float64)[None, :, None]
    index = torch.arange(d_mlp) % len(keys)
    w = 2 * math.pi * torch.tensor(keys, dtype=torch.float64)[index] / p
    others = torch.tensor([k for k in range(1, p // 2 + 1) if k not in keys], dtype=torch.float64)
    w_other = 2 * math.pi * others[torch.randint(len(others), (d_mlp,), generator=g)] / p
    phase = 2 * math.pi * torch.rand(3, d_mlp, generator=g, dtype=torch.float64)
    acts = torch.relu(torch.cos(w * a + phase[0]) + torch.cos(w * b + phase[1]))
    std = (acts - acts.mean((0, 1))).pow(2).mean((0, 1)).sqrt()
    acts = acts + math.sqrt(2 * nu) * std * torch.cos(w_other * (a + b) + phase[2])
    return (acts * torch.tensor(scales or [1.0] * len(keys), dtype=torch.float64)[index]).float()


@pytest.mark.parametrize("nu", [0.0, 1.0, 2.0])
def test_gap_rule_finds_exactly_the_planted_neuron_frequencies_up_to_noise_2(nu):
    """p = 113, 512 neurons on five key frequencies, each neuron also carrying a random other frequency
    with ``nu`` times its key's variance. Stated level nu = 2 (exact for 20 of 20 seeds at 2, measured;
    at 3 the rule finds no gap for most seeds); two seeds here. From nu = 1 many neurons are dominated by
    their other frequency, and the threshold rule (at least half of the variance of 1% of the neurons)
    returns dozens of those."""
    p = 113
    for seed in range(2):
        keys = _planted_keys(p, 5, seed)
        acts = _planted_neurons(p, 512, keys, nu, seed)
        assert fourier.key_frequencies_from_neurons(acts) == keys, (nu, seed)
        old = fourier.key_frequencies_from_neurons(acts, rule="threshold")
        assert old == keys if nu < 1 else len(old) > 10, (nu, seed, old)


def test_neuron_gap_rule_counts_neurons_not_variance():
    """A key frequency whose neurons have a hundredth of the others' variance is still key (seen in a p = 53 run)."""
    p = 53
    keys = _planted_keys(p, 4, 0)
    acts = _planted_neurons(p, 256, keys, 0.5, 0, scales=[1.0, 1.0, 1.0, 0.1])
    assert fourier.key_frequencies_from_neurons(acts) == keys
    assert_close(fourier.neurons_per_frequency(acts), fourier.neuron_frequency_fractions(acts).sum(-1))
    counts = fourier.neurons_per_frequency(acts)[[k - 1 for k in keys]]
    assert_close(counts, torch.full((4,), 64 / 1.5), rtol=0.05, atol=0)  # each neuron: 1 / (1 + nu) on its key
    dead = torch.cat([acts, torch.full((p, p, 10), 0.7)], -1)  # constant neurons vote for nothing
    assert_close(fourier.neurons_per_frequency(dead), fourier.neurons_per_frequency(acts))


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
    key_part = torch.stack([torch.cos(w * (a + b)), torch.sin(w * (a + b))], -1) @ torch.randn(
        2, 6, dtype=torch.float64
    )
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

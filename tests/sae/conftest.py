"""SAE test helpers: synthetic activations built from known sparse directions."""

from __future__ import annotations

import pytest
import torch

from mechscope.sae.config import config_keys


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matrices train faster on one thread, especially on a shared machine."""
    yield


def unit_rows(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    rows = torch.randn(n, d, generator=gen)
    return rows / rows.norm(dim=-1, keepdim=True)


def sparse_codes(n: int, n_true: int, gen: torch.Generator, p: float = 0.06) -> torch.Tensor:
    """Each of ``n_true`` features fires with probability ``p`` with magnitude in [0.5, 1.5]."""
    mask = torch.rand(n, n_true, generator=gen) < p
    return mask * (torch.rand(n, n_true, generator=gen) + 0.5)


def mean_max_cosine(learned: torch.Tensor, true: torch.Tensor) -> float:
    """For each true direction, the best cosine with a learned row; averaged."""
    learned = learned / learned.norm(dim=-1, keepdim=True)
    return float((true @ learned.T).max(-1).values.mean())


def knobs_for(architecture: str, **wanted) -> dict:
    """The settings among ``wanted`` that ``architecture`` has (so one test can cover the registry)."""
    keys = set(config_keys(architecture))
    return {key: value for key, value in wanted.items() if key in keys}

"""k-sparse probes: rankings against scikit-learn, the exact search against a loop, the per-layer sweep."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope import probing
from mechscope.errors import InputError

pytest.importorskip("sklearn")
from sklearn.feature_selection import f_classif  # noqa: E402


def planted(n=1200, d=30, informative=(7, 19, 3), seed=0):
    """Features where the label depends on a few planted dimensions (decreasing weight)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    score = sum((1.5 / (i + 1)) * x[:, f] for i, f in enumerate(informative))
    y = (score + 0.3 * torch.randn(n, generator=gen) > 0).long()
    return x, y


def test_f_statistic_matches_sklearn():
    x, y = planted()
    order, scores = probing.rank_features(x, y, "f_statistic")
    f, _ = f_classif(x.numpy(), y.numpy())
    assert_close(scores, torch.tensor(f, dtype=torch.float32), rtol=1e-4, atol=1e-4)
    assert order[:3].tolist() == [7, 19, 3]


@pytest.mark.parametrize("method", ["mean_difference", "l1"])
def test_rankings_put_planted_features_first(method):
    x, y = planted()
    order, _ = probing.rank_features(x, y, method)
    assert order[:3].tolist() == [7, 19, 3]


def test_curve_and_exact_search():
    x, y = planted()
    train, test = torch.arange(800), torch.arange(800, 1200)
    curve = probing.sparse_probe_curve(x[train], y[train], x[test], y[test], ks=(1, 2, 4))
    assert [c.k for c in curve] == [1, 2, 4]
    f1 = [c.test["f1"] for c in curve]
    assert f1[0] < f1[1] < f1[2]
    exact = probing.exact_sparse_search(x[train], y[train], x[test], y[test], k=2, candidates=8, chunk=5)
    assert sorted(exact.features) == [7, 19]
    # the batched fit of every pair equals fitting the winning pair alone
    alone = probing.fit_logistic(x[train][:, exact.features], y[train], probing.ProbeConfig(l2=1e-3))
    assert_close(exact.weight, alone.weight[0, :, 0], rtol=1e-3, atol=1e-4)
    dense = exact.to_probe()
    assert_close(dense.predict(x[test])[:, 0], (x[test][:, exact.features] @ exact.weight + exact.bias > 0).long())
    with pytest.raises(InputError, match="k in 1..3"):
        probing.exact_sparse_search(x[train], y[train], x[test], y[test], k=4)


def test_layer_sweep_finds_the_layer_that_holds_the_feature():
    x, y = planted(n=600, d=12, informative=(5,))
    noise = torch.randn(600, 12, generator=torch.Generator().manual_seed(1))
    acts = {"blocks.0.hook_resid_post": noise, "blocks.1.hook_resid_post": x}
    out = probing.sparse_layer_sweep(
        acts, y, torch.arange(400), torch.arange(400, 600), ks=(1, 2), exact_k=(1,), candidates=4
    )
    assert out["blocks.1.hook_resid_post"]["curve"][0].features == [5]
    assert out["blocks.1.hook_resid_post"]["exact"][0].features == [5]
    assert (
        out["blocks.1.hook_resid_post"]["curve"][0].test["f1"]
        > out["blocks.0.hook_resid_post"]["curve"][0].test["f1"] + 0.3
    )

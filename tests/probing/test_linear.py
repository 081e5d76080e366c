"""Probes fitted in torch against scikit-learn on the same data, and their metrics, files and splits."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope import probing
from mechscope.errors import InputError, LoadError
from mechscope.probing import ProbeConfig

sklearn = pytest.importorskip("sklearn")
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.metrics import f1_score, roc_auc_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402


def blobs(n=1500, d=12, n_classes=3, n_targets=1, seed=0, raw=True):
    """Gaussian features (``raw``: shifted and unevenly scaled, as activations are) and labels
    from noisy linear scores."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if raw:
        x = x * torch.linspace(0.5, 3, d, dtype=torch.float64) + 2.0
    labels = []
    for _ in range(n_targets):
        w = torch.randn(d, n_classes, generator=gen, dtype=torch.float64)
        noise = torch.randn(n, n_classes, generator=gen, dtype=torch.float64)
        labels.append(
            (x @ w / d**0.5 + noise).argmax(1)
            if n_classes > 2
            else (x @ w[:, 0] / d**0.5 + noise[:, 0] > (x @ w[:, 0] / d**0.5).median()).long()
        )
    return x, torch.stack(labels, 1)


def sklearn_fit(x, y, C, scale=False):
    clf = LogisticRegression(C=C, tol=1e-10, max_iter=20000)
    if scale:
        pipe = make_pipeline(StandardScaler(), clf).fit(x.numpy(), y.numpy())
        sc = pipe[0]
        coef = torch.tensor(clf.coef_ / sc.scale_)
        intercept = torch.tensor(clf.intercept_) - coef @ torch.tensor(sc.mean_)
        return coef.T, intercept, torch.tensor(pipe.predict(x.numpy()))
    clf.fit(x.numpy(), y.numpy())
    return torch.tensor(clf.coef_).T, torch.tensor(clf.intercept_), torch.tensor(clf.predict(x.numpy()))


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("standardize", [False, True])
def test_logistic_matches_sklearn(n_classes, standardize):
    x, y = blobs(n=800, n_classes=n_classes, n_targets=3, raw=standardize)  # raw features need the scaling
    C = 0.05
    probe = probing.fit_logistic(x, y, ProbeConfig(l2=1 / (C * len(x)), tol=1e-10, standardize=standardize))
    assert probe.weight.shape == (3, x.shape[1], 1 if n_classes == 2 else n_classes)
    pred = probe.predict(x)
    for t in range(3):
        coef, intercept, sk_pred = sklearn_fit(x, y[:, t], C, scale=standardize)
        assert_close(probe.weight[t], coef, rtol=1e-4, atol=1e-5)
        assert_close(probe.bias[t], intercept, rtol=1e-4, atol=1e-5)
        assert_close(pred[:, t], sk_pred)


def test_minibatch_and_float32_reach_sklearn_accuracy():
    x, y = blobs(n=1500, n_classes=3, n_targets=2, seed=1)
    C = 1.0
    full = probing.fit_logistic(x.float(), y, ProbeConfig(l2=1 / (C * len(x))))
    mini = probing.fit_logistic(x.float(), y, ProbeConfig(l2=1 / (C * len(x)), batch_size=250, epochs=10, lr=5e-2))
    for t in range(2):
        _, _, sk_pred = sklearn_fit(x, y[:, t], C)
        sk_acc = (sk_pred == y[:, t]).double().mean().item()
        assert_close(full.evaluate(x.float(), y)["accuracy"][t].item(), sk_acc, atol=2e-3, rtol=0)
        assert_close(mini.evaluate(x.float(), y)["accuracy"][t].item(), sk_acc, atol=1.5e-2, rtol=0)


def test_ignored_labels_equal_dropped_rows():
    x, y = blobs(n=600, n_classes=2, n_targets=2, seed=2)
    gappy = y.clone()
    gappy[:100, 1] = -1
    cfg = ProbeConfig(l2=1e-3, tol=1e-10, standardize=False)
    both = probing.fit_logistic(x, gappy, cfg)
    alone = probing.fit_logistic(x[100:], y[100:, 1], cfg)
    assert_close(both.weight[1], alone.weight[0], rtol=1e-5, atol=1e-6)


def test_early_stopping_keeps_best_validation_weights():
    x, y = blobs(n=3000, d=40, n_classes=2, seed=3)
    groups = torch.arange(len(x)) // 10
    cfg = ProbeConfig(l2=0.0, batch_size=64, epochs=200, lr=0.1, val_fraction=0.2, patience=2)
    probe = probing.fit_logistic(x.float(), y, cfg, groups=groups)
    assert probe.info["epochs"] < 200
    held = probing.group_split(groups, 0.2, seed=0)
    assert bool((held.view(-1, 10) == held.view(-1, 10)[:, :1]).all())  # groups never straddle the split
    val_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        probe.logits(x.float()[held])[:, 0, 0], y[held, 0].float()
    ).item()
    assert_close(val_loss, probe.info["val_loss"][0], rtol=1e-4, atol=1e-5)


def test_ridge_matches_sklearn():
    x, _ = blobs(n=500, d=10)
    targets = torch.stack([x @ torch.linspace(-1, 1, 10, dtype=torch.float64) + 0.3, x[:, 0] ** 2], 1)
    l2 = 0.1
    probe = probing.fit_linear(x, targets, ProbeConfig(l2=l2, standardize=False))
    for t in range(2):
        ridge = Ridge(alpha=l2 * len(x)).fit(x.numpy(), targets[:, t].numpy())
        assert_close(probe.weight[t, :, 0], torch.tensor(ridge.coef_), rtol=1e-6, atol=1e-8)
        assert_close(probe.bias[t, 0].item(), float(ridge.intercept_), rtol=1e-6, atol=1e-8)


def test_mean_difference_is_class_means():
    x, y = blobs(n=400, n_classes=3, seed=4)
    probe = probing.fit_mean_difference(x, y)
    means = torch.stack([x[y[:, 0] == c].mean(0) for c in range(3)], 1)
    assert_close(probe.weight[0], means)
    nearest = torch.cdist(x, means.T).argmin(1)
    assert_close(probe.predict(x)[:, 0], nearest)
    binary = probing.fit_mean_difference(x, (y[:, 0] == 1).long())
    assert_close(binary.direction(unit=False), x[y[:, 0] == 1].mean(0) - x[y[:, 0] != 1].mean(0))


def test_metrics_match_sklearn():
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 2, (300,), generator=gen)
    scores = (labels + torch.randn(300, generator=gen)).round(decimals=1)  # ties
    pred = (scores > 0.5).long()
    assert_close(probing.auroc(scores, labels)[0].item(), roc_auc_score(labels, scores), rtol=1e-6, atol=1e-7)
    assert_close(probing.f1_score(pred, labels)[0].item(), f1_score(labels, pred), rtol=1e-6, atol=1e-7)
    multi, multi_pred = torch.randint(0, 4, (300,), generator=gen), torch.randint(0, 4, (300,), generator=gen)
    assert_close(
        probing.f1_score(multi_pred, multi, n_classes=4)[0].item(),
        f1_score(multi, multi_pred, average="macro"),
        rtol=1e-6,
        atol=1e-7,
    )
    assert torch.isnan(probing.auroc(scores, torch.zeros(300, dtype=torch.long))[0])


def test_save_load_and_directions(tmp_path):
    x, y = blobs(n=300, n_classes=3, n_targets=2, seed=6)
    probe = probing.fit_logistic(
        x.float(), y, hook="blocks.1.hook_resid_post", target_names=["a", "b"], class_names=["empty", "mine", "theirs"]
    )
    loaded = probing.LinearProbe.load(probe.save(tmp_path / "p"))
    assert_close(loaded.weight, probe.weight)
    assert_close(loaded.bias, probe.bias)
    assert (loaded.hook, loaded.class_names, loaded.kind) == (probe.hook, probe.class_names, "logistic")
    d = loaded.direction(1, positive=1, negative=2)
    assert_close(d.norm().item(), 1.0)
    raw = probe.weight[1, :, 1] - probe.weight[1, :, 2]
    assert_close(d, raw / raw.norm())
    # moving along the direction raises logit 1 against logit 2 by exactly |raw| per unit
    before, after = probe.logits(x[:1].float())[0, 1], probe.logits(x[:1].float() + d)[0, 1]
    assert_close((after[1] - after[2]) - (before[1] - before[2]), raw.norm(), rtol=1e-4, atol=1e-4)
    (tmp_path / "q.json").write_text("{}")
    with pytest.raises(LoadError, match="both"):
        probing.LinearProbe.load(tmp_path / "q")
    with pytest.raises(InputError, match="out of range"):
        probe.direction(5)


def test_probes_named_after_hooks_keep_their_own_files(tmp_path):
    """Dots in a name are not a suffix: one probe per layer in one folder, each loaded back."""
    x, y = blobs(n=120, n_classes=3, n_targets=2, seed=7)
    probes = {
        layer: probing.fit_logistic(x.float() * (layer + 1), y, hook=f"blocks.{layer}.hook_resid_post")
        for layer in range(3)
    }
    for layer, probe in probes.items():
        probe.save(tmp_path / f"mine_theirs.blocks.{layer}.hook_resid_post")
    assert len(list(tmp_path.glob("*.json"))) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3
    for layer, probe in probes.items():
        for name in (f"mine_theirs.blocks.{layer}.hook_resid_post", f"mine_theirs.blocks.{layer}.hook_resid_post.json"):
            loaded = probing.LinearProbe.load(tmp_path / name)
            assert loaded.hook == probe.hook
            assert_close(loaded.weight, probe.weight)


def test_collected_activations_match_the_cache(model):
    tokens = torch.randint(50, (5, 7), generator=torch.Generator().manual_seed(0))
    keep = torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    hooks = ["blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]
    data = probing.collect_activations(model, tokens, hooks, keep, batch_size=2)
    _, cache = model.run_with_cache(tokens)
    for hook in hooks:
        assert_close(data[hook], cache[hook][keep])
    per_token = torch.arange(35).view(5, 7)
    assert_close(data.labels_for(per_token), per_token[keep])
    assert_close(data.labels_for(torch.arange(5) * 10), data.sequence * 10)
    train, test = probing.split_by_sequence(data.sequence, 0.4, seed=3)
    assert set(data.sequence[train].tolist()).isdisjoint(data.sequence[test].tolist())
    assert len(train) + len(test) == len(data)
    with pytest.raises(Exception, match="closest"):
        probing.collect_activations(model, tokens, "blocks.0.hook_resid_pots")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, y: probing.fit_logistic(x.masked_fill(x > 2.5, float("nan")), y), "NaN or infinite"),
        (lambda x, y: probing.fit_logistic(x[:, 0], y), r"\[batch, d_model\]"),
        (lambda x, y: probing.fit_logistic(x[None], y), r"\[batch, d_model\]"),
        (lambda x, y: probing.fit_logistic(x, y[:-1]), "label rows"),
        (lambda x, y: probing.fit_logistic(x, y.double() / 2), "whole numbers"),
        (lambda x, y: probing.fit_linear(x, y.double().masked_fill(y == 0, float("inf"))), "labels hold NaN"),
        (lambda x, y: probing.fit_mean_difference(x.masked_fill(x > 2.5, float("inf")), y), "NaN or infinite"),
        (lambda x, y: probing.rank_features(x.masked_fill(x > 2.5, float("nan")), (y > 0).long()), "NaN"),
    ],
)
def test_bad_activations_and_labels_are_named(call, match):
    """Non-finite activations, a wrong rank, mismatched rows and fractional class labels fail
    with the problem named, not an optimiser or einsum error (or a probe fitted on NaN)."""
    x, y = blobs(n=200, n_classes=3, seed=3)
    with pytest.raises(InputError, match=match):
        call(x, y[:, 0])

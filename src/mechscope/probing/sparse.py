"""k-sparse probes (Gurnee et al. 2023, "Finding Neurons in a Haystack").

A binary feature is probed from only ``k`` dimensions (neurons) of an activation: rank the
dimensions on the training rows (`rank_features`: mean difference, ANOVA F-statistic or entry
order along an L1 regularisation path), fit a logistic probe on the top ``k`` for
``k = 1, 2, 4, ...`` (`sparse_probe_curve`), or search every set of up to three dimensions among
the top candidates exactly (`exact_sparse_search`, all sets fitted as one batched problem).
`sparse_layer_sweep` does both for several hooks: the table the paper plots (best test F1 by
layer and k).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.probing import metrics
from mechscope.probing.linear import ProbeConfig, check_rows, fit_weights
from mechscope.probing.probe import LinearProbe

Ranking = Literal["mean_difference", "f_statistic", "l1"]
RANKINGS = ("mean_difference", "f_statistic", "l1")


def _binary(y: Tensor) -> Tensor:
    y = y.reshape(-1).long()
    if not bool(((y == 0) | (y == 1)).all()) or y.min() == y.max():
        raise InputError("sparse probes need binary labels (0/1) holding both classes")
    return y


def rank_features(
    x: Float[Tensor, "batch d_model"],
    labels: Int[Tensor, " batch"],
    method: Ranking = "mean_difference",
    *,
    l1_steps: int = 40,
    l1_iters: int = 30,
) -> tuple[Int[Tensor, " d_model"], Float[Tensor, " d_model"]]:
    """Dimensions of ``x`` ordered from most to least predictive of binary ``labels``, with scores.

    ``mean_difference``: ``|mean(x | 1) - mean(x | 0)|``. ``f_statistic``: the one-way ANOVA F
    (scikit-learn's ``f_classif``). ``l1``: the order in which dimensions enter an L1-regularised
    logistic regression on standardised features as the penalty falls from the value at which
    every weight is zero (``l1_steps`` penalties, geometric down to 1e-3 of it, ``l1_iters``
    proximal-gradient steps each); the score is ``l1_steps`` minus the entry step (ties broken
    by the final weight's size).

    Example:
        >>> x = torch.randn(400, 5); y = (x[:, 3] + 0.1 * torch.randn(400) > 0).long()
        >>> [int(rank_features(x, y, m)[0][0]) for m in ("mean_difference", "f_statistic", "l1")]
        [3, 3, 3]
    """
    check_rows(x, labels)
    y = _binary(labels).to(x.device)
    x = x.double()
    pos, neg = x[y == 1], x[y == 0]
    if method == "mean_difference":
        scores = (pos.mean(0) - neg.mean(0)).abs()
    elif method == "f_statistic":
        n = x.shape[0]
        grand = x.mean(0)
        between = len(pos) * (pos.mean(0) - grand) ** 2 + len(neg) * (neg.mean(0) - grand) ** 2
        within = ((pos - pos.mean(0)) ** 2).sum(0) + ((neg - neg.mean(0)) ** 2).sum(0)
        scores = between / (within / (n - 2)).clamp_min(1e-30)
    elif method == "l1":
        scores = _l1_entry_scores(x, y.double(), l1_steps, l1_iters)
    else:
        raise InputError(f"unknown ranking {method!r}; choose among {list(RANKINGS)}")
    return scores.argsort(descending=True, stable=True), scores.float()


def _l1_entry_scores(x: Tensor, y: Tensor, steps: int, iters: int) -> Tensor:
    n, d = x.shape
    xs = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-12)
    p0 = y.mean()
    lam_max = float((xs.T @ (y - p0)).abs().max() / n)
    lipschitz = 0.25 * float(torch.linalg.matrix_norm(xs, ord=2) ** 2 / n)
    w, b = torch.zeros(d, dtype=x.dtype, device=x.device), torch.log(p0 / (1 - p0))
    entered = torch.full((d,), steps, dtype=torch.long, device=x.device)
    for step, lam in enumerate(torch.logspace(0, -3, steps).tolist()):
        lam *= lam_max
        for _ in range(iters):
            residual = torch.sigmoid(xs @ w + b) - y
            w = w - xs.T @ residual / (n * lipschitz)
            w = torch.sign(w) * (w.abs() - lam / lipschitz).clamp_min(0)
            b = b - residual.mean() / 0.25
        entered = torch.where((w != 0) & (entered == steps), step, entered)
    size = w.abs() / (w.abs().max() + 1e-30)
    return (steps - entered).double() + 0.5 * size


@dataclass
class SparseProbe:
    """A probe on ``k`` dimensions of an activation, and how it scores.

    Example:
        >>> sp = SparseProbe([4, 1], torch.tensor([1.0, -1.0]), 0.5, 10, {"f1": 0.9})
        >>> sp.to_probe().direction(unit=False).tolist()
        [0.0, -1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """

    features: list[int]
    """Indices of the dimensions read (neurons)."""
    weight: Float[Tensor, " k"]
    """One weight per feature, on the raw activation."""
    bias: float
    d_model: int
    """Width of the probed activation."""
    test: dict[str, float] = field(default_factory=dict)
    """Test metrics: ``accuracy``, ``f1``, ``auroc``."""
    train_loss: float | None = None
    hook: str | None = None

    @property
    def k(self) -> int:
        """The number of dimensions read (``len(features)``)."""
        return len(self.features)

    def to_probe(self) -> LinearProbe:
        """The same probe as a dense `LinearProbe` (zero weight off its features)."""
        weight = torch.zeros(1, self.d_model, 1, dtype=self.weight.dtype)
        weight[0, self.features, 0] = self.weight.cpu()
        return LinearProbe(weight, torch.tensor([[self.bias]], dtype=self.weight.dtype), "logistic", 2, self.hook,
                           info={"features": self.features, "test": self.test})  # fmt: skip


def _scores(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """Test metrics of per-target features ``[batch, target, k]`` with weights ``[target, k, 1]``."""
    logits = torch.einsum("ntk,tko->nto", x, weight)[..., 0] + bias[:, 0]  # [batch, target]
    labels = y[:, None].expand_as(logits)
    pred = (logits > 0).long()
    return {"accuracy": metrics.accuracy(pred, labels), "f1": metrics.f1_score(pred, labels),
            "auroc": metrics.auroc(logits, labels)}  # fmt: skip


def _fit_sets(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, sets: Tensor, cfg: ProbeConfig
              ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:  # fmt: skip
    """Fit one probe per row of ``sets`` (``[n_sets, k]`` feature indices) as one batched problem."""
    xs_train = x_train[:, sets]  # [batch, set, k]
    y = y_train[:, None].expand(-1, sets.shape[0])
    weight, bias, _ = fit_weights(xs_train, y, 1, cfg)
    with torch.no_grad():
        logits = torch.einsum("ntk,tko->nto", xs_train, weight)[..., 0] + bias[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction="none").mean(
            0
        )
    return weight, bias, loss, _scores(x_test[:, sets], y_test, weight, bias)


def sparse_probe_curve(
    x_train: Float[Tensor, "batch d_model"], y_train: Int[Tensor, " batch"],
    x_test: Float[Tensor, "batch d_model"], y_test: Int[Tensor, " batch"],
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32), method: Ranking = "mean_difference",
    cfg: ProbeConfig | None = None, hook: str | None = None,
) -> list[SparseProbe]:  # fmt: skip
    """Logistic probes on the top ``k`` dimensions (ranked on the training rows by ``method``), one per ``k``.

    Example:
        >>> x = torch.randn(600, 8); y = (x[:, 2] - x[:, 5] > 0).long()
        >>> curve = sparse_probe_curve(x[:400], y[:400], x[400:], y[400:], ks=(1, 2))
        >>> sorted(curve[1].features), curve[1].test["f1"] > curve[0].test["f1"]
        ([2, 5], True)
    """
    cfg = cfg or ProbeConfig(l2=1e-3)
    y_train, y_test = _binary(y_train), _binary(y_test)
    order, _ = rank_features(x_train, y_train, method)
    out = []
    for k in ks:
        if not 1 <= k <= x_train.shape[1]:
            raise InputError(f"k={k} must be between 1 and the activation width {x_train.shape[1]}")
        top = order[:k][None]  # [1, k]
        weight, bias, loss, scores = _fit_sets(x_train, y_train, x_test, y_test, top, cfg)
        out.append(SparseProbe(top[0].tolist(), weight[0, :, 0], float(bias[0, 0]), x_train.shape[1],
                               {m: float(v[0]) for m, v in scores.items()}, float(loss[0]), hook))  # fmt: skip
    return out


def exact_sparse_search(
    x_train: Float[Tensor, "batch d_model"], y_train: Int[Tensor, " batch"],
    x_test: Float[Tensor, "batch d_model"], y_test: Int[Tensor, " batch"],
    k: int = 2, candidates: int = 16, method: Ranking = "f_statistic", cfg: ProbeConfig | None = None,
    hook: str | None = None, chunk: int = 512,
) -> SparseProbe:  # fmt: skip
    """The best probe on exactly ``k <= 3`` dimensions among the top ``candidates`` (by ``method``).

    Every one of the ``C(candidates, k)`` sets is fitted, ``chunk`` sets per batched fit; the
    winner is the set with the lowest *training* loss (the test rows only score it).

    Example:
        >>> x = torch.randn(600, 8); y = (x[:, 2] - x[:, 5] > 0).long()
        >>> sorted(exact_sparse_search(x[:400], y[:400], x[400:], y[400:], k=2, candidates=6).features)
        [2, 5]
    """
    if not 1 <= k <= 3:
        raise InputError(f"the exact search takes k in 1..3 (C(candidates, k) fits), got k={k}")
    candidates = min(candidates, x_train.shape[1])
    if candidates < k:
        raise InputError(f"candidates={candidates} must be >= k={k}")
    cfg = cfg or ProbeConfig(l2=1e-3)
    y_train, y_test = _binary(y_train), _binary(y_test)
    order, _ = rank_features(x_train, y_train, method)
    sets = torch.tensor(list(itertools.combinations(order[:candidates].tolist(), k)))
    best = None
    for start in range(0, len(sets), chunk):
        part = sets[start : start + chunk]
        weight, bias, loss, scores = _fit_sets(x_train, y_train, x_test, y_test, part, cfg)
        i = int(loss.argmin())
        if best is None or float(loss[i]) < best.train_loss:
            best = SparseProbe(part[i].tolist(), weight[i, :, 0], float(bias[i, 0]), x_train.shape[1],
                               {m: float(v[i]) for m, v in scores.items()}, float(loss[i]), hook)  # fmt: skip
    return best


def sparse_layer_sweep(
    activations: dict[str, Float[Tensor, "batch d_model"]], labels: Int[Tensor, " batch"],
    train: Int[Tensor, " batch"], test: Int[Tensor, " batch"],
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32), method: Ranking = "mean_difference", exact_k: Sequence[int] = (),
    candidates: int = 16, cfg: ProbeConfig | None = None, progress: bool = False,
) -> dict[str, dict]:  # fmt: skip
    """k-sparse probes per hook: ``{hook: {"curve": [SparseProbe per k], "exact": [SparseProbe per exact k]}}``.

    ``train``/``test`` are row indices (split by sequence: `mechscope.probing.data.split_by_sequence`).

    Example:
        >>> x = torch.randn(300, 6); y = (x[:, 1] > 0).long()
        >>> out = sparse_layer_sweep({"a": x, "b": -x}, y, torch.arange(200), torch.arange(200, 300), ks=(1,))
        >>> [out[h]["curve"][0].features for h in ("a", "b")]
        [[1], [1]]
    """
    out = {}
    for hook, x in tqdm(activations.items(), desc="sparse probes", disable=not progress, leave=False):
        xt, yt, xv, yv = x[train], labels[train], x[test], labels[test]
        curve = sparse_probe_curve(xt, yt, xv, yv, ks, method, cfg, hook)
        exact = [exact_sparse_search(xt, yt, xv, yv, k, candidates, method, cfg, hook) for k in exact_k]
        out[hook] = {"curve": curve, "exact": exact}
    return out

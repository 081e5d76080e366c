"""Fitting linear probes in torch: logistic regression, linear regression, mean-difference directions.

Many probes over the same activations fit as one batched problem: ``labels`` is
``[batch, target]`` and the weights ``[target, d_model, out]`` (e.g. 64 board squares x 3
classes in one fit). Each target's objective is independent of the others:

    mean over labelled rows of the log-loss  +  l2 / 2 * ||w||^2       (the bias is not penalised)

which is scikit-learn's ``LogisticRegression(C=1 / (l2 * n_rows))`` (binary: one logit;
multi-class: softmax over one weight vector per class). Full-batch fits use L-BFGS with a
strong-Wolfe line search (the exact optimum, comparable with scikit-learn's coefficients);
minibatch fits use Adam. With ``val_fraction`` a held-out part of the *groups* (sequences)
stops each target's fit when its validation loss stops improving and keeps its best weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError
from mechscope.probing.metrics import IGNORE
from mechscope.probing.probe import LinearProbe, labels_matrix


@dataclass
class ProbeConfig:
    """How a probe is fitted.

    Example:
        >>> ProbeConfig(l2=1e-3, batch_size=4096).batch_size
        4096
    """

    l2: float = 1e-4
    """L2 penalty ``l2 / 2 * ||w||^2`` added to the mean loss (scikit-learn's ``C = 1 / (l2 * n_rows)``)."""
    batch_size: int | None = None
    """``None``: full batch with L-BFGS; otherwise Adam on minibatches of this many rows."""
    max_iter: int = 500
    """L-BFGS iterations (full batch)."""
    epochs: int = 20
    """Passes over the data (minibatch)."""
    lr: float = 1e-2
    """Adam learning rate (minibatch)."""
    tol: float = 1e-6
    """L-BFGS stops when the largest gradient entry falls below this."""
    standardize: bool = True
    """Fit on features scaled to zero mean and unit variance, then fold the scaling into the weights
    (the penalty then acts on standardised weights, as with scikit-learn after a ``StandardScaler``)."""
    val_fraction: float = 0.0
    """Fraction of groups held out for early stopping (0: none)."""
    patience: int = 3
    """Checks without a better validation loss before a target stops (epochs, or rounds of ``check_every``)."""
    check_every: int = 25
    """L-BFGS iterations between validation checks (full batch with early stopping)."""
    device: str | None = None
    """Where to fit; ``None``: CUDA when available, else where the activations are."""
    seed: int = 0
    """Seed of the minibatch order and the validation split."""

    def __post_init__(self) -> None:
        if self.l2 < 0:
            raise ConfigError(f"l2 must be >= 0, got {self.l2}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("max_iter", "epochs", "patience", "check_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be None (full batch) or >= 1, got {self.batch_size}")


Loss = Literal["logistic", "squared"]


def _device(cfg: ProbeConfig, x: Tensor) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    return torch.device("cuda") if torch.cuda.is_available() else x.device


def _scaling(x: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Mean and scale over rows (``[*rest]``); a constant feature keeps scale 1."""
    if not standardize:
        ones = torch.ones(x.shape[1:], dtype=x.dtype, device=x.device)
        return torch.zeros_like(ones), ones
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    return mean, torch.where(std > 1e-8 * (mean.abs() + 1), std, torch.ones_like(std))


def _outputs(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``[batch, target, out]`` from shared features ``[batch, d]`` or per-target ``[batch, target, d]``."""
    if x.dim() == 2:
        return torch.einsum("nd,tdo->nto", x, w) + b
    return torch.einsum("ntd,tdo->nto", x, w) + b


def _per_target_loss(out: Tensor, y: Tensor, loss: Loss) -> Tensor:
    """Mean loss over labelled rows, per target: ``[target]``."""
    if loss == "squared":
        return 0.5 * ((out[..., 0] - y) ** 2).mean(0)
    valid = y != IGNORE
    if out.shape[-1] == 1:
        per = F.binary_cross_entropy_with_logits(out[..., 0], y.clamp_min(0).to(out.dtype), reduction="none")
    else:
        per = F.cross_entropy(out.permute(0, 2, 1), y.clamp_min(0), reduction="none")  # [batch, target]
    return (per * valid).sum(0) / valid.sum(0).clamp_min(1)


def check_rows(x: Tensor, y: Tensor, dims: tuple[int, ...] = (2,), finite: bool = True) -> None:
    """Check activations of the expected rank (``dims``) with finite values (unless ``finite`` is
    False: a caller whose fit checks them again), and one label row per activation row; raise an
    `InputError` naming the problem otherwise.

    Example:
        >>> check_rows(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
        >>> check_rows(torch.zeros(4), torch.zeros(4))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.InputError: activations must be [batch, d_model], got shape (4,); flatten ...
    """
    if x.dim() not in dims:
        shape = " or ".join({2: "[batch, d_model]", 3: "[batch, target, d_model]"}[d] for d in dims)
        raise InputError(f"activations must be {shape}, got shape {tuple(x.shape)}; "
                         "flatten batch and position first (e.g. x.reshape(-1, x.shape[-1]))")  # fmt: skip
    if y.dim() > 2:
        raise InputError(f"labels must be [batch] or [batch, target], got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise InputError(f"{x.shape[0]} activation rows but {y.shape[0]} label rows")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise InputError(f"activations hold {int((~torch.isfinite(x)).sum())} NaN or infinite values; "
                         "drop or fix those rows before fitting")  # fmt: skip
    if finite and y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise InputError("labels hold NaN or infinite values; mark an unlabelled row with -1 (classes) or drop it")


def _class_labels(labels: Tensor) -> Tensor:
    """Class-index labels as ``[batch, target]`` long; float labels must hold whole numbers."""
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise InputError("class labels must be whole numbers (-1 for none); for continuous targets use fit_linear")
    return labels_matrix(labels).long()


def group_split(groups: Int[Tensor, " batch"], fraction: float, seed: int = 0) -> Tensor:
    """A boolean mask of the rows whose group falls in a random ``fraction`` of the groups.

    Rows of one group (one sequence, one game) are always on the same side, so no text is
    seen in training and in evaluation.

    Example:
        >>> held = group_split(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 0.5)
        >>> held.tolist().count(True), bool((held[0::2] == held[1::2]).all())
        (4, True)
    """
    unique, inverse = torch.unique(groups, return_inverse=True)
    n_held = int(round(fraction * len(unique)))
    if fraction > 0 and not 0 < n_held < len(unique):
        need = "; hold out a fraction below 1"
        if fraction < 1:  # both sides need round(fraction * n) and n minus it >= 1: n near 0.5 / min(f, 1 - f)
            start = max(2, int(0.5 / min(fraction, 1 - fraction)))
            fewest = next(n for n in range(start, start + 10) if 0 < round(fraction * n) < n)
            need = f"; use at least {fewest} groups (texts, games)"
        raise InputError(f"cannot hold out {fraction} of {len(unique)} groups and keep both sides non-empty{need}")
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))
    held = torch.zeros(len(unique), dtype=torch.bool)
    held[order[:n_held]] = True
    return held[inverse.cpu()]


def fit_weights(
    x: Float[Tensor, " batch *d_model"],
    y: Tensor,
    out: int,
    cfg: ProbeConfig,
    loss: Loss = "logistic",
    groups: Int[Tensor, " batch"] | None = None,
    progress: bool = False,
) -> tuple[Float[Tensor, "target d_model out"], Float[Tensor, "target out"], dict]:
    """The optimiser behind every fitted probe: weights on raw features and a record of the fit.

    ``x`` is ``[batch, d]`` (shared by every target) or ``[batch, target, d]`` (each target its
    own features, as in the exact search of k-sparse probes); ``y`` is ``[batch, target]``
    (class indices, -1 for none; floats for ``loss="squared"``); ``out`` is 1 for binary
    logistic and regression, the number of classes otherwise. Returns ``weight [target, d, out]``,
    ``bias [target, out]`` on the input's device, and ``{"iterations" or "epochs", "val_loss"}``.

    Example:
        >>> x = torch.randn(200, 3); y = (x[:, :1] > 0).long()
        >>> w, b, info = fit_weights(x, y, 1, ProbeConfig(l2=1e-2))
        >>> w.shape, bool(w[0, 0, 0] > w[0, 1:, 0].abs().max())
        (torch.Size([1, 3, 1]), True)
    """
    check_rows(x, y, (2, 3))
    home, device = x.device, _device(cfg, x)
    n_targets, d = y.shape[1], x.shape[-1]
    if x.dim() == 3 and x.shape[1] != n_targets:
        raise InputError(f"per-target features [batch, target, d] have {x.shape[1]} targets, labels {n_targets}")
    x, y = x.to(device), y.to(device)
    mean, scale = _scaling(x, cfg.standardize)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    w = torch.zeros(n_targets, d, out, dtype=dtype, device=device, requires_grad=True)
    b = torch.zeros(n_targets, out, dtype=dtype, device=device, requires_grad=True)
    held = torch.zeros(x.shape[0], dtype=torch.bool)
    if cfg.val_fraction > 0:
        held = group_split(torch.arange(x.shape[0]) if groups is None else groups.cpu(), cfg.val_fraction, cfg.seed)
    held = held.to(device)
    x_fit, y_fit = (x[~held] - mean) / scale, y[~held]
    x_val, y_val = (x[held] - mean) / scale, y[held]

    def objective(xb: Tensor, yb: Tensor) -> Tensor:
        return _per_target_loss(_outputs(xb, w, b), yb, loss).sum() + 0.5 * cfg.l2 * (w * w).sum()

    best = {"loss": torch.full((n_targets,), float("inf"), device=device), "w": w.detach().clone(),
            "b": b.detach().clone(), "wait": torch.zeros(n_targets, dtype=torch.long, device=device)}  # fmt: skip

    def check() -> bool:
        """Keep each target's best weights; whether every target has run out of patience."""
        if cfg.val_fraction == 0:
            return False
        with torch.no_grad():
            val = _per_target_loss(_outputs(x_val, w, b), y_val, loss)
        better = val < best["loss"] - 1e-7
        best["loss"] = torch.where(better, val, best["loss"])
        best["w"][better], best["b"][better] = w.detach()[better], b.detach()[better]
        best["wait"] = torch.where(better, 0, best["wait"] + 1)
        return bool((best["wait"] >= cfg.patience).all())

    info: dict = {}
    if cfg.batch_size is None:
        optimizer = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=cfg.max_iter,
            tolerance_grad=cfg.tol,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = objective(x_fit, y_fit)
            value.backward()
            return value

        if cfg.val_fraction == 0:
            optimizer.step(closure)
        else:
            optimizer.param_groups[0]["max_iter"] = cfg.check_every
            for _ in tqdm(range(-(-cfg.max_iter // cfg.check_every)), desc="probe", disable=not progress, leave=False):
                optimizer.step(closure)
                if check():
                    break
        info["iterations"] = optimizer.state[w].get("n_iter", 0)
    else:
        optimizer = torch.optim.Adam([w, b], lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        n_fit = x_fit.shape[0]
        for epoch in tqdm(range(1, cfg.epochs + 1), desc="probe", disable=not progress, leave=False):
            order = torch.randperm(n_fit, generator=generator).to(device)
            for start in range(0, n_fit, cfg.batch_size):
                rows = order[start : start + cfg.batch_size]
                optimizer.zero_grad()
                objective(x_fit[rows], y_fit[rows]).backward()
                optimizer.step()
            info["epochs"] = epoch
            if check():
                break
    if cfg.val_fraction > 0:
        check()
        w_best, b_best = best["w"], best["b"]
        info["val_loss"] = best["loss"].tolist()
    else:
        w_best, b_best = w.detach(), b.detach()
    # fold the standardisation in: w . (x - mean) / scale + b = (w / scale) . x + (b - (w / scale) . mean)
    scale_t = scale if scale.dim() == 2 else scale.expand(n_targets, d)
    mean_t = mean if mean.dim() == 2 else mean.expand(n_targets, d)
    weight = w_best / scale_t[..., None]
    bias = b_best - torch.einsum("tdo,td->to", weight, mean_t)
    return weight.to(home), bias.to(home), info


def _classes(y: Tensor, n_classes: int | None) -> int:
    labelled = y[y != IGNORE]
    if labelled.numel() == 0:
        raise InputError("no labelled rows (every label is -1)")
    if labelled.min() < 0:
        raise InputError(f"class labels must be >= 0 (or -1 for none), found {int(labelled.min())}")
    found = int(labelled.max()) + 1
    n = max(found, 2) if n_classes is None else n_classes
    if found > n:
        raise InputError(f"labels go up to {found - 1} but n_classes={n_classes}; pass n_classes >= {found}")
    return n


def fit_logistic(
    x: Float[Tensor, "batch d_model"],
    labels: Int[Tensor, " batch *target"],
    cfg: ProbeConfig | None = None,
    *,
    n_classes: int | None = None,
    groups: Int[Tensor, " batch"] | None = None,
    hook: str | None = None,
    target_names: list[str] | None = None,
    class_names: list[str] | None = None,
    progress: bool = False,
) -> LinearProbe:
    """Logistic-regression probes: binary (one logit) or multi-class (softmax), one per label column.

    ``labels`` is ``[batch]`` or ``[batch, target]`` of class indices (-1: no label); every
    target shares ``n_classes`` (default: inferred). ``groups`` (e.g. sequence ids) keeps the
    early-stopping split by group.

    Example:
        >>> x = torch.randn(300, 4)
        >>> labels = torch.stack([(x[:, 0] > 0).long(), (x[:, 1] > 0).long() + (x[:, 1] > 1).long()], 1)
        >>> probe = fit_logistic(x, labels, n_classes=3)
        >>> probe.weight.shape, bool(probe.evaluate(x, labels)["accuracy"].min() > 0.9)
        (torch.Size([2, 4, 3]), True)
    """
    cfg = cfg or ProbeConfig()
    check_rows(x, labels, finite=False)  # fit_weights checks the values
    y = _class_labels(labels)
    n = _classes(y, n_classes)
    weight, bias, info = fit_weights(x.float() if not x.is_floating_point() else x, y, 1 if n == 2 else n, cfg,
                                     "logistic", groups, progress)  # fmt: skip
    return LinearProbe(weight, bias, "logistic", n, hook, target_names, class_names,
                       {"config": asdict(cfg), "n_rows": x.shape[0], **info})  # fmt: skip


def fit_linear(
    x: Float[Tensor, "batch d_model"],
    targets: Float[Tensor, " batch *target"],
    cfg: ProbeConfig | None = None,
    *,
    hook: str | None = None,
    target_names: list[str] | None = None,
) -> LinearProbe:
    """Ridge-regression probes, one per target column, in closed form:
    ``mean((x w + b - y)^2) / 2 + l2 / 2 * ||w||^2`` (scikit-learn's ``Ridge(alpha=l2 * n_rows)``).

    Example:
        >>> x = torch.randn(100, 3, dtype=torch.float64)
        >>> probe = fit_linear(x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 3, ProbeConfig(l2=0))
        >>> probe.weight[0, :, 0].round(decimals=6).tolist(), round(probe.bias[0, 0].item(), 6)
        ([1.0, -2.0, 0.5], 3.0)
    """
    cfg = cfg or ProbeConfig()
    minibatch = cfg.batch_size is not None or cfg.val_fraction > 0
    check_rows(x, targets, finite=not minibatch)  # fit_weights checks the values
    if not x.is_floating_point():
        x = x.float()
    y = labels_matrix(targets).to(x.dtype)
    if minibatch:
        weight, bias, info = fit_weights(x, y, 1, cfg, "squared")
        return LinearProbe(weight, bias, "linear", 0, hook, target_names, None, {"config": asdict(cfg), **info})
    home, device = x.device, _device(cfg, x)
    x, y = x.to(device), y.to(device)
    _, scale = _scaling(x, cfg.standardize)
    mean = x.mean(0)  # the unpenalised intercept: centre features and targets
    xs = (x - mean) / scale
    n, d = xs.shape
    gram = xs.T @ xs / n + cfg.l2 * torch.eye(d, dtype=xs.dtype, device=device)
    w = torch.linalg.solve(gram, xs.T @ (y - y.mean(0)) / n)  # [d_model, target]
    weight = (w / scale[:, None]).T[..., None]  # [target, d_model, 1]
    bias = (y.mean(0) - torch.einsum("tdo,d->t", weight, mean))[:, None]
    return LinearProbe(weight.to(home), bias.to(home), "linear", 0, hook, target_names, None,
                       {"config": asdict(cfg), "n_rows": n})  # fmt: skip


def fit_mean_difference(
    x: Float[Tensor, "batch d_model"],
    labels: Int[Tensor, " batch *target"],
    *,
    n_classes: int | None = None,
    hook: str | None = None,
    target_names: list[str] | None = None,
    class_names: list[str] | None = None,
) -> LinearProbe:
    """Class-mean probes: the nearest class mean wins (``logit_c = mu_c . x - |mu_c|^2 / 2``).

    For binary labels the single direction is ``mu_1 - mu_0`` and the threshold sits halfway
    between the means. A class absent from a target's labels gets a logit of -inf.

    Example:
        >>> x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [2.0, 0.0], [2.0, 1.0]])
        >>> probe = fit_mean_difference(x, torch.tensor([0, 0, 1, 1]))
        >>> probe.direction(unit=False), probe.predict(x)[:, 0].tolist()
        (tensor([2., 0.]), [0, 0, 1, 1])
    """
    check_rows(x, labels)
    if not x.is_floating_point():
        x = x.float()
    y = _class_labels(labels).to(x.device)
    n = _classes(y, n_classes)
    onehot = F.one_hot(y.clamp_min(0), n).to(x.dtype) * (y != IGNORE)[..., None]  # [batch, target, class]
    counts = onehot.sum(0)  # [target, class]
    means = torch.einsum("ntc,nd->tdc", onehot, x) / counts.clamp_min(1)[:, None]  # [target, d_model, class]
    bias = -0.5 * (means * means).sum(1)
    bias = torch.where(counts > 0, bias, torch.full_like(bias, float("-inf")))
    if n == 2:
        means, bias = means[..., 1:] - means[..., :1], bias[:, 1:] - bias[:, :1]
    return LinearProbe(means, bias, "mean_difference", n, hook, target_names, class_names,
                       {"class_counts": counts.tolist()})  # fmt: skip

"""Classification metrics for probes: accuracy, F1 and AUROC, per target, in torch.

Every function takes predictions for ``target`` columns at once (``[batch, target]``, or
``[batch]`` for one target) and returns one value per target; labels of ``-1`` are ignored
(a row that has no label for that target).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError

IGNORE = -1
"""Label value of a row that carries no label for a target."""


def _columns(*tensors: Tensor) -> list[Tensor]:
    shapes = {tuple(t.shape[:2]) if t.dim() > 1 else (t.shape[0],) for t in tensors}
    if len(shapes) != 1:
        raise InputError(f"predictions and labels disagree in shape: {[tuple(t.shape) for t in tensors]}")
    return [t[:, None] if t.dim() == 1 else t for t in tensors]


def accuracy(
    predicted: Int[Tensor, " batch *target"], labels: Int[Tensor, " batch *target"]
) -> Float[Tensor, " *target"]:
    """Fraction of labelled rows where ``predicted == labels``, per target.

    Example:
        >>> accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 0, 0, -1]))
        tensor([0.6667])
    """
    predicted, labels = _columns(predicted, labels)
    valid = labels != IGNORE
    return ((predicted == labels) & valid).sum(0) / valid.sum(0).clamp_min(1)


def f1_score(
    predicted: Int[Tensor, " batch *target"], labels: Int[Tensor, " batch *target"], n_classes: int = 2
) -> Float[Tensor, " *target"]:
    """F1 per target: of class 1 for binary labels, the unweighted mean over classes otherwise.

    A class with no true and no predicted rows counts as F1 = 0, as in scikit-learn's
    ``f1_score(..., zero_division=0)``; the multi-class mean runs over the classes present in
    the labels or the predictions (scikit-learn's ``average="macro"``).

    Example:
        >>> f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 1]))
        tensor([0.5000])
    """
    predicted, labels = _columns(predicted, labels)
    valid = labels != IGNORE
    classes = [1] if n_classes == 2 else range(n_classes)
    scores, present = [], []
    for c in classes:
        tp = ((predicted == c) & (labels == c) & valid).sum(0).float()
        pred_c = ((predicted == c) & valid).sum(0).float()
        true_c = ((labels == c) & valid).sum(0).float()
        scores.append(2 * tp / (pred_c + true_c).clamp_min(1))
        present.append((pred_c + true_c) > 0)
    scores, present = torch.stack(scores), torch.stack(present)  # [class, target]
    if n_classes == 2:
        return scores[0]
    return (scores * present).sum(0) / present.sum(0).clamp_min(1)


def auroc(scores: Float[Tensor, " batch *target"], labels: Int[Tensor, " batch *target"]) -> Float[Tensor, " *target"]:
    """Area under the ROC curve of binary labels, per target (the Mann-Whitney statistic, ties
    counted half). A target whose labelled rows hold only one class gets NaN.

    Example:
        >>> auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1]))
        tensor([0.7500])
    """
    scores, labels = _columns(scores, labels)
    out = torch.full((scores.shape[1],), float("nan"))
    for t in range(scores.shape[1]):
        valid = labels[:, t] != IGNORE
        s, y = scores[valid, t].double(), labels[valid, t]
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos == 0 or n_neg == 0:
            continue
        ranks = _average_ranks(s)
        out[t] = float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return out


def _average_ranks(values: Tensor) -> Tensor:
    """Ranks 1 ... n with tied values sharing their mean rank."""
    order = values.argsort()
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks

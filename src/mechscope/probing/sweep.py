"""Dense probes on several hooks (per-layer sweeps), each fitted on the training rows and scored on the test rows."""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.probing.linear import ProbeConfig, fit_linear, fit_logistic, fit_mean_difference
from mechscope.probing.probe import LinearProbe

DenseKind = Literal["logistic", "linear", "mean_difference"]


def fit_probe(x: Float[Tensor, "batch d_model"], labels: Tensor, kind: DenseKind = "logistic",
              cfg: ProbeConfig | None = None, **metadata) -> LinearProbe:  # fmt: skip
    """Fit one probe of ``kind`` (``logistic``, ``linear`` or ``mean_difference``).

    ``metadata`` (``hook``, ``target_names``, ``class_names``, ``n_classes``, ``groups``) goes to the fitter.

    Example:
        >>> x = torch.randn(100, 4)
        >>> fit_probe(x, (x[:, 0] > 0).long(), "mean_difference").kind
        'mean_difference'
    """
    if kind == "logistic":
        return fit_logistic(x, labels, cfg, **metadata)
    metadata.pop("groups", None)
    if kind == "linear":
        metadata.pop("class_names", None)
        metadata.pop("n_classes", None)
        return fit_linear(x, labels, cfg, **metadata)
    if kind == "mean_difference":
        return fit_mean_difference(x, labels, **metadata)
    raise InputError(f"unknown probe kind {kind!r}; choose among ['logistic', 'linear', 'mean_difference']")


def probe_layers(
    activations: dict[str, Float[Tensor, "batch d_model"]],
    labels: Tensor,
    train: Int[Tensor, " batch"],
    test: Int[Tensor, " batch"],
    kind: DenseKind = "logistic",
    cfg: ProbeConfig | None = None,
    progress: bool = False,
    **metadata,
) -> dict[str, dict]:
    """One probe per hook: ``{hook: {"probe": LinearProbe, "train": metrics, "test": metrics}}``.

    ``train`` and ``test`` are row indices (split by sequence); metrics are per target (see
    `LinearProbe.evaluate`).

    Example:
        >>> x = torch.randn(200, 4); y = (x[:, 0] > 0).long()
        >>> out = probe_layers({"h": x}, y, torch.arange(150), torch.arange(150, 200))
        >>> bool(out["h"]["test"]["accuracy"][0] > 0.9)
        True
    """
    out = {}
    for hook, x in tqdm(activations.items(), desc="probes", disable=not progress, leave=False):
        probe = fit_probe(x[train], labels[train], kind, cfg, hook=hook, **metadata)
        with torch.no_grad():
            out[hook] = {"probe": probe, "train": probe.evaluate(x[train], labels[train]),
                         "test": probe.evaluate(x[test], labels[test])}  # fmt: skip
    return out

"""Figures of the interpretability-illusion check: the patching effect of each subspace, of its
row-space part and of its kernel part, and the variance of the activations along each part.

The figures take plain numbers (one row per subspace), so they do not depend on how they were
computed; `mechscope.subspace.illusion_check` produces them. Both are single-panel marker plots,
so `save_png` can draw them offline.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.heatmap import save_heatmaps
from mechscope.viz.png import save_png

PARTS = ("whole subspace", "row-space part", "kernel part")
COLOURS = ("#222222", "#1f77b4", "#d62728")


def _values(values: Tensor, n: int, width: int, what: str) -> list[list[float]]:
    values = torch.as_tensor(values).detach().float().cpu()
    if values.shape != (n, width):
        raise InputError(f"{what} must be [n_subspaces={n}, {width}], got shape {tuple(values.shape)}")
    return values.tolist()


def parts_figure(names: Sequence[str], values: Tensor, title: str, y_title: str, parts: Sequence[str] = PARTS):
    """Markers of ``values [n_subspaces, len(parts)]``: one trace per part, subspaces along x.

    Example:
        >>> fig = parts_figure(["v"], torch.tensor([[2.0, 0.0, 0.0]]), "effects", "metric change")
        >>> [trace.name for trace in fig.data]
        ['whole subspace', 'row-space part', 'kernel part']
    """
    import plotly.graph_objects as go

    rows = _values(values, len(names), len(parts), "values")
    labels = [html.escape(str(n)) for n in names]
    fig = go.Figure()
    for j, (part, colour) in enumerate(zip(parts, COLOURS, strict=False)):
        fig.add_trace(go.Scatter(x=labels, y=[row[j] for row in rows], name=part, mode="markers",
                                 marker={"size": 12, "color": colour, "symbol": j}))  # fmt: skip
    fig.update_layout(title=html.escape(title), yaxis_title=html.escape(y_title), xaxis_title="subspace",
                      width=720, height=420)  # fmt: skip
    return fig


def illusion_figures(names: Sequence[str], effects: Tensor, variances: Tensor, title: str = "") -> list:
    """Two figures: patching effects ``[n, 3]`` (whole, row-space part, kernel part) and
    variances ``[n, 3]`` of the activations along each.

    Example:
        >>> figs = illusion_figures(["v"], torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.5]]))
        >>> len(figs)
        2
    """
    prefix = f"{title}: " if title else ""
    return [
        parts_figure(names, effects, f"{prefix}patching effect", "change of the metric"),
        parts_figure(names, variances, f"{prefix}variance of the activations along each part", "variance"),
    ]


def save_illusion_figures(
    names: Sequence[str],
    effects: Tensor,
    variances: Tensor,
    path: str | os.PathLike,
    title: str = "interpretability-illusion check",
    table_html: str = "",
    png: bool = True,
) -> list[Path]:
    """Write the figures into one HTML file at ``path`` (with ``table_html`` above them) and, with
    ``png``, each as ``{stem}_effect.png`` and ``{stem}_variance.png`` beside it; returns the paths.

    Example:
        >>> import tempfile, pathlib
        >>> out = save_illusion_figures(["v"], torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.5]]),
        ...                             pathlib.Path(tempfile.mkdtemp()) / "check.html", png=False)
        >>> [p.suffix for p in out]
        ['.html']
    """
    path = Path(path)
    figures = illusion_figures(names, effects, variances, title)
    written = [save_heatmaps(figures, path, title, intro=table_html)]
    if png:
        for fig, kind in zip(figures, ("effect", "variance"), strict=True):
            out = save_png(fig, path.with_name(f"{path.stem}_{kind}.png"))
            if out is not None:
                written.append(out)
    return written

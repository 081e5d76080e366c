"""Heatmaps of patching results: layer x position (with token labels) and layer x head.

Figures are plotly figures; `save_heatmaps` writes several into one self-contained HTML file
with plotly's JavaScript inlined once (no network needed to view it; each figure's camera
button saves a PNG from the browser). `save_png` (from `mechscope.viz.png`) writes a PNG with
``kaleido`` or, offline, with matplotlib. Token labels are HTML-escaped, since plotly renders a
subset of HTML in labels.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.html import write_atomic
from mechscope.viz.png import save_png

__all__ = [
    "figures_html",
    "heatmap_figure",
    "layer_head_heatmap",
    "layer_pos_heatmap",
    "save_heatmaps",
    "save_png",
    "token_labels",
]


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # pragma: no cover - plotly is a dependency
        raise ImportError("heatmaps need plotly: pip install plotly") from exc
    return go


def _matrix(values: Tensor, what: str) -> list[list[float]]:
    values = torch.as_tensor(values).detach().float().cpu()
    if values.dim() != 2:
        raise InputError(f"{what} must be 2-D [layer, ...], got shape {tuple(values.shape)}")
    return values.tolist()


def token_labels(str_tokens: Sequence[str]) -> list[str]:
    """Unique, escaped axis labels ``"{i} {token}"`` (plotly merges equal category labels).

    Example:
        >>> token_labels(["<b>", " John", " John"])
        ['0 &lt;b&gt;', '1 \u00a0John', '2 \u00a0John']
    """
    shown = [html.escape(t).replace(" ", "\u00a0").replace("\n", "\u21b5") for t in str_tokens]
    return [f"{i} {t}" for i, t in enumerate(shown)]


def heatmap_figure(
    values: Tensor,
    x_labels: Sequence[str],
    y_labels: Sequence[str],
    title: str,
    x_title: str,
    y_title: str = "layer",
    colorbar_title: str = "",
):
    """A diverging (zero-centred, red-blue) heatmap with hover values; ``values`` is ``[y, x]``.

    NaN and infinite cells are drawn blank, named in the hover text and counted in the title.

    Example:
        >>> fig = heatmap_figure(torch.zeros(2, 3), ["a", "b", "c"], ["0", "1"], "demo", "pos")
        >>> fig.layout.title.text, len(fig.data[0].z)
        ('demo', 2)
    """
    go = _plotly()
    z = _matrix(values, "values")
    if len(z) != len(y_labels) or len(z[0]) != len(x_labels):
        raise InputError(f"values are {len(z)} x {len(z[0])} but labels are {len(y_labels)} x {len(x_labels)}")
    finite = [abs(v) for row in z for v in row if math.isfinite(v)]
    limit = max(finite, default=0.0) or 1.0
    n_bad = sum(len(row) for row in z) - len(finite)
    text = [[f"{v:.4f}" if math.isfinite(v) else str(v) for v in row] for row in z]  # hover names nan/inf
    if n_bad:  # plotly draws non-finite cells blank; say so
        title = f"{title} ({n_bad} NaN or infinite cells, drawn blank)"
    fig = go.Figure(
        go.Heatmap(
            z=[[v if math.isfinite(v) else None for v in row] for row in z],
            text=text,
            x=list(x_labels),
            y=list(y_labels),
            colorscale="RdBu",
            zmid=0.0,
            zmin=-limit,
            zmax=limit,
            colorbar={"title": {"text": html.escape(colorbar_title)}},
            hovertemplate=f"{html.escape(y_title)} %{{y}}<br>{html.escape(x_title)} %{{x}}<br>%{{text}}<extra></extra>",
        )
    )
    fig.update_layout(
        title={"text": html.escape(title)},
        xaxis_title=html.escape(x_title),
        yaxis_title=html.escape(y_title),
        yaxis={"autorange": "reversed", "type": "category"},
        xaxis={"type": "category"},
        width=max(500, 40 * len(x_labels) + 200),
        height=max(350, 18 * len(y_labels) + 150),
    )
    return fig


def layer_pos_heatmap(
    values: Tensor, str_tokens: Sequence[str], title: str, colorbar_title: str = "", layers: Sequence[int] | None = None
):
    """Layer x position results ``[layer, pos]`` with the prompt's tokens on the x axis.

    ``layers`` labels the rows (default ``0, 1, ...``), e.g. for a sweep over every third layer.

    Example:
        >>> fig = layer_pos_heatmap(torch.randn(3, 2), ["When", " Mary"], "resid_pre")
        >>> list(fig.data[0].x)
        ['0 When', '1 \u00a0Mary']
    """
    values = torch.as_tensor(values)
    if values.dim() != 2 or values.shape[1] != len(str_tokens):
        raise InputError(f"values {tuple(values.shape)} need one column per token ({len(str_tokens)} tokens)")
    rows = _layer_labels(values, layers)
    return heatmap_figure(values, token_labels(str_tokens), rows, title, "position", colorbar_title=colorbar_title)


def _layer_labels(values: Tensor, layers: Sequence[int] | None) -> list[str]:
    if layers is None:
        return [str(i) for i in range(values.shape[0])]
    if len(layers) != values.shape[0]:
        raise InputError(f"{len(layers)} layer labels for {values.shape[0]} rows of values")
    return [str(int(layer)) for layer in layers]


def layer_head_heatmap(values: Tensor, title: str, colorbar_title: str = "", layers: Sequence[int] | None = None):
    """Layer x head results ``[layer, head]`` (``layers`` labels the rows, default ``0, 1, ...``).

    Example:
        >>> layer_head_heatmap(torch.randn(3, 4), "z").layout.xaxis.title.text
        'head'
    """
    values = torch.as_tensor(values)
    if values.dim() != 2:
        raise InputError(f"values must be [layer, head], got shape {tuple(values.shape)}")
    heads = [str(i) for i in range(values.shape[1])]
    return heatmap_figure(values, heads, _layer_labels(values, layers), title, "head", colorbar_title=colorbar_title)


def figures_html(figures: Sequence, title: str, intro: str = "", sections: Sequence[str] | None = None) -> str:
    """One HTML document with every figure; plotly's JavaScript is inlined once.

    ``sections`` are optional HTML fragments (already escaped) placed after each figure.

    Example:
        >>> doc = figures_html([layer_head_heatmap(torch.ones(2, 2), "x")], "<report>")
        >>> "&lt;report&gt;" in doc and "<script src=" not in doc
        True
    """
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False}))
        if sections is not None and i < len(sections):
            parts.append(sections[i])
    body = "\n".join(parts)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:sans-serif;margin:1.5em;} table{border-collapse:collapse;} "
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right;}</style>\n"
        f"</head><body>\n<h1>{html.escape(title)}</h1>\n{intro}\n{body}\n</body></html>\n"
    )


def save_heatmaps(figures: Sequence, path: str | os.PathLike, title: str, intro: str = "", sections=None) -> Path:
    """Write `figures_html` to ``path`` atomically (temporary file, then rename); returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> figure = layer_head_heatmap(torch.ones(2, 2), "x")
        >>> out = save_heatmaps([figure], pathlib.Path(tempfile.mkdtemp()) / "r.html", "r")
        >>> out.stat().st_size > 100_000
        True
    """
    return write_atomic(path, figures_html(figures, title, intro, sections))

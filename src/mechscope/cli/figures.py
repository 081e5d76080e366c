"""Self-contained HTML reports (plotly, its JavaScript inlined once) with a JSON of their numbers.

Every figure's toolbar has plotly's camera button, which saves a PNG in the browser without
any server or extra package; `write_report` also writes the figures it can draw offline as PNG
files beside the report (`write_pngs`).
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from mechscope.errors import ConfigError
from mechscope.viz.html import write_atomic


def _plotly():
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as exc:  # pragma: no cover - plotly is a dependency
        raise ConfigError("the toy reports need plotly: pip install plotly") from exc
    return go, make_subplots


def write_report(
    path: str | os.PathLike,
    title: str,
    sections: list[tuple[str, Any]],
    numbers: dict,
    summary: list[str] = (),
    png: bool = True,
) -> tuple[Path, Path]:
    """Write ``path`` (HTML) and the same name with ``.json`` (the numbers); return both paths.

    ``sections`` are ``(heading, figure)`` pairs, a figure being a plotly figure or plain text.
    All text is HTML-escaped; plotly's JavaScript is inlined once, so the page works offline.
    With ``png``, every figure that `mechscope.viz.png.save_png` can draw is also written to
    ``<name>_png/NN_<heading>.png`` beside the report.

    Example:
        >>> import tempfile, plotly.graph_objects as go
        >>> out = Path(tempfile.mkdtemp()) / "r.html"
        >>> html_path, json_path = write_report(out, "<demo>", [("a", go.Figure())], {"x": 1})
        >>> "&lt;demo&gt;" in html_path.read_text(), json.loads(json_path.read_text())
        (True, {'x': 1})
    """
    path = Path(path)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        (
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
            "pre{background:#f4f4f4;padding:.6em}</style></head><body>"
        ),
        f"<h1>{html.escape(title)}</h1>",
    ]
    if summary:
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in summary) + "</ul>")
    first = True
    for heading, figure in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(figure, str):
            parts.append(f"<pre>{html.escape(figure)}</pre>")
            continue
        parts.append(figure.to_html(full_html=False, include_plotlyjs=first))
        first = False
    parts.append("</body></html>")
    write_atomic(path, "\n".join(parts))
    json_path = path.with_suffix(".json")
    write_atomic(json_path, json.dumps(numbers, indent=2))
    if png:
        write_pngs(path.with_name(path.stem + "_png"), sections)
    return path, json_path


def write_pngs(folder: str | os.PathLike, sections: list[tuple[str, Any]]) -> list[Path]:
    """Save each drawable figure of ``sections`` as ``folder/NN_<heading>.png``; return the files.

    Figures the offline renderer cannot draw (subplots, 3-D) are skipped; if no PNG backend is
    installed, `save_png` warns once and nothing is written.

    Example:
        >>> import tempfile, plotly.graph_objects as go
        >>> files = write_pngs(tempfile.mkdtemp(), [("Loss", go.Figure(go.Scatter(y=[2, 1]))), ("note", "text")])
        >>> [f.name for f in files]
        ['00_loss.png']
    """
    from mechscope.errors import InputError
    from mechscope.viz.png import save_png

    written = []
    for i, (heading, figure) in enumerate(sections):
        if isinstance(figure, str):
            continue
        slug = re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_") or "figure"
        try:
            out = save_png(figure, Path(folder) / f"{i:02d}_{slug}.png")
        except InputError:
            continue
        if out is None:
            break
        written.append(out)
    return written


def line_figure(x: list, series: dict[str, list], title: str, x_title: str, log_y: bool = False):
    """A plotly line chart of several named series sharing ``x`` (``None`` values are gaps).

    Example:
        >>> fig = line_figure([0, 1], {"loss": [2.0, 1.0]}, "t", "step", log_y=True)
        >>> fig.layout.yaxis.type
        'log'
    """
    go, _ = _plotly()
    fig = go.Figure()
    for name, values in series.items():
        xs = x[name] if isinstance(x, dict) else x
        fig.add_trace(go.Scatter(x=xs, y=values, mode="lines", name=name))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_type="log" if log_y else "linear", height=420)
    return fig


def heatmap_figure(
    z,
    title: str,
    x: list | None = None,
    y: list | None = None,
    colorscale: str = "RdBu",
    zmid: float | None = 0.0,
    x_title: str = "",
    y_title: str = "",
):
    """A plotly heatmap of a 2-D array (rows top to bottom).

    Diverging data (``zmid`` set, the default 0) is centred on ``zmid``; sequential data
    (``zmid=None``) that is never negative starts its colour scale at 0, so a scale never
    suggests negative values that are not there. The offline PNG uses the same range.

    Example:
        >>> heatmap_figure([[1, -1], [0, 2]], "W").data[0].zmid
        0.0
        >>> heatmap_figure([[1, 3], [0.5, 2]], "norms", colorscale="Blues", zmid=None).data[0].zmin
        0.0
    """
    go, _ = _plotly()
    finite = [v for row in z for v in row if v is not None and math.isfinite(v)]
    scale = {"zmid": zmid}
    if zmid is None and finite and min(finite) >= 0:
        scale = {"zmin": 0.0, "zmax": max(finite) or 1.0}  # plotly uses zmin only together with zmax
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale=colorscale, **scale))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=420)
    fig.update_yaxes(autorange="reversed")
    return fig

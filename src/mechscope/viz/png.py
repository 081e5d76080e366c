"""PNG export of mechscope's plotly figures, offline.

plotly's own export (``kaleido``) drives a Chrome browser, which many machines lack. `save_png`
uses it when it works and otherwise draws the figure with matplotlib: heatmaps (with their
token labels, colour scale, colour range and colour bar as plotly draws them: diverging scales
centred on ``zmid``, sequential ones over the data's range or ``zmin``/``zmax``) and line/marker
plots on one pair of axes, which covers the patching heatmaps and the single-panel figures of the
toy reports. NaN and infinite cells are drawn grey.
"""

from __future__ import annotations

import html
import os
import warnings
from pathlib import Path
from typing import Literal

from mechscope.errors import ConfigError, InputError
from mechscope.viz.html import temporary_path

Backend = Literal["auto", "kaleido", "matplotlib"]
_SUPPORTED = ("heatmap", "scatter")


def _text(value) -> str:
    """Plotly label text (HTML-escaped, ``<br>`` breaks) as literal matplotlib text."""
    if value is None:
        return ""
    text = html.unescape(str(value).replace("<br>", "\n")).replace("\u00a0", " ")
    return text.replace("$", r"\$")  # no mathtext


def _title(obj) -> str:
    title = getattr(obj, "title", None)
    return _text(getattr(title, "text", None))


def _check_drawable(figure) -> None:
    kinds = {trace.type for trace in figure.data}
    unsupported = sorted(kinds - set(_SUPPORTED))
    if unsupported:
        raise InputError(f"PNG export without kaleido draws {list(_SUPPORTED)} traces, not {unsupported}")
    if any(
        getattr(t, "xaxis", None) not in (None, "x") or getattr(t, "yaxis", None) not in (None, "y")
        for t in figure.data
    ):
        raise InputError("PNG export without kaleido draws single-panel figures; this one has subplots")
    if not kinds:
        raise InputError("the figure has no traces to draw")


def _colormap(colorscale, layout=None):
    """A matplotlib colormap from plotly's ``[(position, "rgb(r, g, b)" or "#rrggbb"), ...]``
    (no scale: the figure template's sequential one, as plotly draws it). Non-finite cells
    are drawn light grey."""
    from matplotlib.colors import LinearSegmentedColormap, to_rgb

    if not colorscale and layout is not None:
        colorscale = getattr(getattr(layout.template.layout, "colorscale", None), "sequential", None)
    if not colorscale:
        import matplotlib

        return matplotlib.colormaps["plasma"].with_extremes(bad="#d9d9d9")  # plotly's default sequential scale
    stops = []
    for position, color in colorscale:
        if color.startswith("rgb"):
            rgb = tuple(float(v) / 255 for v in color[color.index("(") + 1 : -1].split(",")[:3])
        else:
            rgb = to_rgb(color)
        stops.append((float(position), rgb))
    return LinearSegmentedColormap.from_list("plotly", stops).with_extremes(bad="#d9d9d9")


def colour_range(
    z, zmin: float | None = None, zmax: float | None = None, zmid: float | None = None, zauto: bool | None = None
):
    """The colour range plotly gives a heatmap: ``(zmin, zmax)`` when both are set (and ``zauto``
    is not true); otherwise the finite data's minimum and maximum (sequential scales), widened to
    be symmetric around ``zmid`` when that is set (diverging scales). NaN and infinities are ignored.

    Example:
        >>> colour_range([[0.5, 2.0], [1.0, float("nan")]])
        (0.5, 2.0)
        >>> colour_range([[0.5, 2.0], [1.0, float("nan")]], zmin=0.0, zmax=2.0)
        (0.0, 2.0)
        >>> colour_range([[0.0, 2.0], [-1.0, float("inf")]], zmid=0.0)
        (-2.0, 2.0)
    """
    import numpy as np

    if zmin is not None and zmax is not None and not zauto:
        return float(zmin), float(zmax)
    values = np.asarray(z, dtype=float)
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if zmid is not None:
        reach = max(abs(high - zmid), abs(zmid - low)) or 1.0
        low, high = zmid - reach, zmid + reach
    if low == high:
        low, high = low - 0.5, high + 0.5
    return low, high


def _draw_heatmap(fig, ax, trace, layout) -> None:
    import numpy as np

    z = np.asarray([[np.nan if v is None else v for v in row] for row in trace.z], dtype=float)
    vmin, vmax = colour_range(z, trace.zmin, trace.zmax, trace.zmid, trace.zauto)
    z = np.ma.masked_invalid(z)  # NaN and infinities: the colormap's grey
    cmap = _colormap(trace.colorscale, layout)
    image = ax.imshow(z, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    rows, cols = z.shape
    x = [_text(v) for v in trace.x] if trace.x is not None else [str(i) for i in range(cols)]
    y = [_text(v) for v in trace.y] if trace.y is not None else [str(i) for i in range(rows)]
    ax.set_xticks(range(cols), x, rotation=60 if max(map(len, x), default=0) > 3 else 0, ha="right", fontsize=8)
    step = max(1, rows // 40)  # at most about 40 row labels
    ax.set_yticks(range(0, rows, step), y[::step], fontsize=8)
    if layout.yaxis.autorange != "reversed":
        ax.invert_yaxis()
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label(_title(trace.colorbar))


def _draw_scatter(ax, trace) -> None:
    x = list(trace.x) if trace.x is not None else list(range(len(trace.y)))
    mode = trace.mode or "lines"
    style = ("-" if "lines" in mode else "") + ("o" if "markers" in mode else "")
    ax.plot(x, list(trace.y), style or "-", label=_text(trace.name) or None, markersize=3)


def _matplotlib_png(figure, path: Path, dpi: int) -> None:
    from matplotlib.figure import Figure

    _check_drawable(figure)
    layout = figure.layout
    width, height = (layout.width or 700) / 100, (layout.height or 450) / 100
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    for trace in figure.data:
        if trace.type == "heatmap":
            _draw_heatmap(fig, ax, trace, layout)
        else:
            _draw_scatter(ax, trace)
    if any(trace.type == "scatter" and trace.name for trace in figure.data):
        ax.legend(fontsize=8)
    ax.set_title(_title(layout), fontsize=10)
    ax.set_xlabel(_title(layout.xaxis))
    ax.set_ylabel(_title(layout.yaxis))
    if layout.xaxis.type == "log":
        ax.set_xscale("log")
    if layout.yaxis.type == "log":
        ax.set_yscale("log")
    fig.savefig(path, format="png", dpi=dpi)


def _reason(exc: Exception) -> str:
    """The first paragraph of an exception's message on one line (or its type when it has none)."""
    paragraph = str(exc).strip().split("\n\n")[0]
    return " ".join(paragraph.split()).rstrip(":") or type(exc).__name__


def save_png(figure, path: str | os.PathLike, *, backend: Backend = "auto", dpi: int = 100) -> Path | None:
    """Write a plotly figure as a PNG; returns the path.

    ``backend="auto"`` tries plotly's ``kaleido`` export and falls back to matplotlib (heatmaps
    and line/marker plots on one pair of axes; token labels kept); when neither can run it warns
    and returns ``None``. A backend named explicitly (``"kaleido"`` or ``"matplotlib"``) must run:
    if it cannot, a `ConfigError` says why and what to install or choose instead. The file is
    written atomically (temporary file, then rename).

    Example:
        >>> import tempfile, pathlib
        >>> from mechscope.viz.heatmap import layer_pos_heatmap
        >>> fig = layer_pos_heatmap(torch.randn(3, 2), ["When", " Mary"], "resid_pre")
        >>> out = save_png(fig, pathlib.Path(tempfile.mkdtemp()) / "resid.png", backend="matplotlib")
        >>> out.read_bytes()[:4]
        b'\\x89PNG'
    """
    if backend not in ("auto", "kaleido", "matplotlib"):
        raise InputError(f"backend must be 'auto', 'kaleido' or 'matplotlib', got {backend!r}")
    path = Path(path)
    tmp = str(temporary_path(path))  # mode from the umask, unlike mkstemp's 0600
    reasons = []
    try:
        if backend in ("auto", "kaleido"):
            try:
                figure.write_image(tmp, format="png")
                os.replace(tmp, path)
                return path
            except (ImportError, RuntimeError, ValueError, OSError) as exc:
                if backend == "kaleido":
                    raise ConfigError(
                        f"backend='kaleido' cannot run ({_reason(exc)}); pip install 'kaleido>=1' and run "
                        "plotly_get_chrome for a Chrome browser, or pass backend='matplotlib' (or 'auto')"
                    ) from exc
                reasons.append(f"kaleido: {_reason(exc)}")
        try:
            _matplotlib_png(figure, Path(tmp), dpi)
            os.replace(tmp, path)
            return path
        except ImportError as exc:
            if backend == "matplotlib":
                raise ConfigError(
                    f"backend='matplotlib' cannot run ({_reason(exc)}); pip install matplotlib, "
                    "or pass backend='kaleido' (or 'auto')"
                ) from exc
            reasons.append(f"matplotlib: {_reason(exc)}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    warnings.warn(
        f"PNG export skipped ({'; '.join(reasons)}); pip install matplotlib (or kaleido>=1 with a Chrome "
        "browser) to enable it, or use the camera button of the HTML figure",
        stacklevel=2,
    )
    return None

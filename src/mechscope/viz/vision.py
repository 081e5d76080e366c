"""Per-patch values drawn over images: HTML (self-contained) and PNG (matplotlib).

Everything here takes tensors: an image is ``[height, width, 3]`` with values in ``[0, 1]``
(`mechscope.vision.display_image` makes one from any image), a grid is ``[n_rows, n_cols]`` (one
value per patch: attention from the class token, a patching effect, an activation norm). Panels
with negative values use a diverging red-blue scale centred on zero; others a sequential scale.
Captions and labels are HTML-escaped in pages and drawn as literal text in PNGs.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.html import page, write_atomic


@dataclass
class Overlay:
    """One panel: an image, the per-patch values drawn over it and a caption.

    Example:
        >>> panel = Overlay(torch.rand(16, 16, 3), torch.eye(4), "a diagonal", box=(0, 0, 4, 4))
        >>> panel.image.shape, panel.grid.shape, panel.caption
        (torch.Size([16, 16, 3]), torch.Size([4, 4]), 'a diagonal')
    """

    image: Tensor
    """``[height, width, 3]`` in ``[0, 1]``."""
    grid: Tensor
    """``[n_rows, n_cols]``; the rows and columns must tile the image evenly."""
    caption: str = ""
    box: tuple[int, int, int, int] | None = None
    """Optional pixel box ``(top, left, bottom, right)`` outlined on the image."""

    def __post_init__(self) -> None:
        self.image = torch.as_tensor(self.image, dtype=torch.float32).detach().cpu()
        self.grid = torch.as_tensor(self.grid, dtype=torch.float32).detach().cpu()
        if self.image.dim() != 3 or self.image.shape[-1] != 3:
            raise InputError(f"an overlay image is [height, width, 3], got {tuple(self.image.shape)}")
        if self.grid.dim() != 2:
            raise InputError(f"an overlay grid is [n_rows, n_cols], got {tuple(self.grid.shape)}")
        height, width = self.image.shape[:2]
        rows, cols = self.grid.shape
        if height % rows or width % cols:
            raise InputError(f"a {rows}x{cols} grid does not tile a {height}x{width} image")


def _colour(value: float, limit: float, diverging: bool) -> str:
    """An ``rgba`` CSS colour: red for positive, blue for negative (diverging), else orange."""
    if not np.isfinite(value):
        return "rgba(128,128,128,0.6)"
    strength = min(1.0, abs(value) / limit) if limit > 0 else 0.0
    if diverging:
        rgb = "214,39,40" if value >= 0 else "33,102,172"
    else:
        rgb = "255,140,0"
    return f"rgba({rgb},{0.75 * strength:.3f})"


def _png_bytes(image: Tensor, box: tuple[int, int, int, int] | None = None) -> bytes:
    from PIL import Image, ImageDraw

    array = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    if box is not None:
        top, left, bottom, right = box
        ImageDraw.Draw(picture).rectangle((left, top, right - 1, bottom - 1), outline=(255, 0, 255))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_html(panel: Overlay, width: int = 224) -> str:
    """One panel as an HTML fragment: the image with a grid of translucent cells over it; each
    cell's tooltip gives its row, column and value.

    Example:
        >>> fragment = overlay_html(Overlay(torch.zeros(8, 8, 3), torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "<cls>"))
        >>> "&lt;cls&gt;" in fragment and "<cls>" not in fragment, fragment.count('class="cell"')
        (True, 4)
    """
    grid = panel.grid
    finite = grid[torch.isfinite(grid)]
    limit = float(finite.abs().max()) if finite.numel() else 0.0
    diverging = bool((finite < 0).any())
    rows, cols = grid.shape
    image = base64.b64encode(_png_bytes(panel.image, panel.box)).decode()
    cells = "".join(
        f'<div class="cell" style="background:{_colour(float(grid[r, c]), limit, diverging)}" '
        f'title="row {r}, col {c}: {float(grid[r, c]):.4g}"></div>'
        for r in range(rows)
        for c in range(cols)
    )
    caption = html.escape(panel.caption)
    return (
        f'<figure class="overlay"><div class="stage" style="width:{width}px;height:{width}px">'
        f'<img src="data:image/png;base64,{image}" alt="{caption}">'
        f'<div class="grid" style="grid-template-columns:repeat({cols},1fr);grid-template-rows:repeat({rows},1fr)">'
        f"{cells}</div></div><figcaption>{caption} (max |value| {limit:.3g})</figcaption></figure>"
    )


_CSS = """
.overlays { display: flex; flex-wrap: wrap; gap: 14px; }
.overlay { margin: 0; }
.stage { position: relative; }
.stage img { width: 100%; height: 100%; image-rendering: pixelated; display: block; }
.grid { position: absolute; inset: 0; display: grid; }
.overlay figcaption { font-size: 12px; max-width: 224px; }
"""


def overlays_page(panels: Sequence[Overlay], title: str, intro: str = "") -> str:
    """A self-contained HTML page of panels (no network needed to view it).

    Example:
        >>> doc = overlays_page([Overlay(torch.zeros(4, 4, 3), torch.ones(2, 2))], "a <b>")
        >>> doc.startswith("<!DOCTYPE html>") and "a &lt;b&gt;" in doc
        True
    """
    body = f"<p>{html.escape(intro)}</p>" if intro else ""
    body += '<div class="overlays">' + "".join(overlay_html(p) for p in panels) + "</div>"
    return page(title, body, css=_CSS)


def save_overlays_html(panels: Sequence[Overlay], path: str | os.PathLike, title: str, intro: str = "") -> Path:
    """Write `overlays_page` to ``path`` (atomically) and return the path.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "overlays.html"
        >>> out = save_overlays_html([Overlay(torch.zeros(8, 8, 3), torch.eye(2), "patch values")], path, "Overlays")
        >>> out == path, "patch values" in path.read_text()
        (True, True)
    """
    return write_atomic(path, overlays_page(panels, title, intro))


def save_overlays_png(
    panels: Sequence[Overlay], path: str | os.PathLike, title: str = "", columns: int = 4, dpi: int = 110
) -> Path:
    """Draw the panels in a grid of ``columns`` with matplotlib, each with its colour bar.

    Example:
        >>> import tempfile, pathlib
        >>> out = save_overlays_png([Overlay(torch.zeros(8, 8, 3), torch.eye(2))],
        ...                         pathlib.Path(tempfile.mkdtemp()) / "o.png", "demo")
        >>> out.read_bytes()[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not panels:
        raise InputError("no panels to draw")
    columns = max(1, min(columns, len(panels)))
    n_rows = (len(panels) + columns - 1) // columns
    fig, axes = plt.subplots(n_rows, columns, figsize=(3.2 * columns, 3.3 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels, strict=False):
        height, width = panel.image.shape[:2]
        ax.imshow(panel.image.clamp(0, 1).numpy(), extent=(0, width, height, 0), interpolation="nearest")
        grid = panel.grid.numpy()
        finite = grid[np.isfinite(grid)]
        limit = float(np.abs(finite).max()) if finite.size else 1.0
        diverging = bool((finite < 0).any())
        shown = ax.imshow(
            np.ma.masked_invalid(grid),
            extent=(0, width, height, 0),
            cmap="RdBu_r" if diverging else "inferno",
            vmin=-limit if diverging else 0.0,
            vmax=limit or 1.0,
            alpha=0.55,
            interpolation="nearest",
        )
        if panel.box is not None:
            top, left, bottom, right = panel.box
            ax.add_patch(plt.Rectangle((left, top), right - left, bottom - top, fill=False, edgecolor="magenta"))
        ax.set_title(panel.caption.replace("$", r"\$"), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title.replace("$", r"\$"), fontsize=10)
    fig.tight_layout()
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return write_atomic(path, buffer.getvalue())


def lens_figure(values: Tensor, labels: Sequence[str], title: str, value_title: str = "score"):
    """The lens over layers as a heatmap ``[layer, label]`` (rows: the residual stream entering
    each layer, then the final one), labels escaped.

    Example:
        >>> fig = lens_figure(torch.zeros(3, 2), ["red <circle>", "blue"], "lens")
        >>> list(fig.data[0].x), list(fig.data[0].y)
        (['red &lt;circle&gt;', 'blue'], ['embed', '1', 'final'])
    """
    from mechscope.viz.heatmap import heatmap_figure

    values = torch.as_tensor(values, dtype=torch.float32).detach().cpu()
    if values.dim() != 2 or values.shape[1] != len(labels):
        raise InputError(f"lens values {tuple(values.shape)} need one column per label ({len(labels)})")
    n = values.shape[0]
    rows = ["embed", *[str(layer) for layer in range(1, n - 1)], "final"]
    x = [html.escape(label) for label in labels]
    return heatmap_figure(
        values, x, rows, title, "label", y_title="residual stream entering layer", colorbar_title=value_title
    )

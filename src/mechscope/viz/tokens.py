"""Tokens coloured by any per-token value (a neuron, a feature, an attribution)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.html import display_token, page

_CSS = """
select { margin-bottom: 1em; }
.series { line-height: 1.9; max-width: 50em; }
.series.hidden { display: none; }
.legend { font-size: 12px; color: #555; margin-bottom: 0.5em; }
"""

_SCRIPT = """
const pick = document.getElementById('series-pick');
if (pick) pick.addEventListener('change', () => {
  document.querySelectorAll('.series').forEach((el, i) => el.classList.toggle('hidden', String(i) !== pick.value));
});
"""


def _colour(value: float, limit: float) -> str:
    """Red for positive, blue for negative, white at zero; alpha grows with ``|value| / limit``
    (infinities are full colour). NaN has no colour: `_style` hatches it."""
    if math.isinf(value):
        alpha = 1.0
    else:
        alpha = min(abs(value) / limit, 1.0) if limit > 0 else 0.0
    rgb = "214,39,40" if value >= 0 else "31,119,180"
    return f"rgba({rgb},{alpha:.3f})"


def _style(value: float, limit: float) -> str:
    if math.isnan(value):
        return "background:repeating-linear-gradient(45deg,#bbb 0 2px,#fff 2px 4px);outline:1px dashed #888"
    return f"background:{_colour(value, limit)}"


def colored_tokens_html(
    str_tokens: Sequence[str],
    values: Float[Tensor, "series pos"] | Float[Tensor, " pos"],
    series_labels: Sequence[str] | None = None,
    title: str = "Token values",
) -> str:
    """A self-contained HTML page of tokens shaded by value (red positive, blue negative).

    ``values`` is ``[pos]`` or ``[series, pos]`` (several neurons or features, chosen with a
    menu). Hovering a token shows its text, position and value. Each series is scaled by its own
    largest finite absolute value; infinities get full colour and NaN a grey hatch, and the
    legend counts them. Token text is HTML-escaped.

    Example:
        >>> doc = colored_tokens_html(['<script>', ' "x"'], torch.tensor([0.5, -1.0]))
        >>> '&lt;script&gt;' in doc and '<script>alert' not in doc
        True
    """
    values = torch.as_tensor(values).detach().float().cpu()
    if values.dim() == 1:
        values = values[None]
    if values.dim() != 2 or values.shape[1] != len(str_tokens):
        raise InputError(f"values must be [pos] or [series, pos] with pos={len(str_tokens)}, got {list(values.shape)}")
    labels = list(series_labels) if series_labels is not None else [f"series {i}" for i in range(values.shape[0])]
    if len(labels) != values.shape[0]:
        raise InputError(f"got {len(labels)} series labels for {values.shape[0]} series")
    parts = []
    if len(labels) > 1:
        options = "".join(f'<option value="{i}">{html.escape(str(label))}</option>' for i, label in enumerate(labels))
        parts.append(f'<select id="series-pick">{options}</select>')
    for i, (label, row) in enumerate(zip(labels, values, strict=True)):
        finite = row[torch.isfinite(row)]
        limit = float(finite.abs().max()) if finite.numel() else 0.0
        bad = int(row.numel() - finite.numel())
        spans = "".join(
            f'<span class="tok" style="{_style(float(v), limit)}" '
            f'title="{html.escape(f"[{pos}] {token!r}: {float(v):.4g}", quote=True)}">'
            f"{html.escape(display_token(str(token)))}</span>"
            for pos, (token, v) in enumerate(zip(str_tokens, row, strict=True))
        )
        note = f"; {bad} NaN or infinite (hatched: NaN; full colour: ±inf)" if bad else ""
        legend = f'<div class="legend">{html.escape(str(label))}: max |finite value| {limit:.4g}{note}</div>'
        parts.append(f'<div class="series{" hidden" if i else ""}">{legend}{spans}</div>')
    return page(title, "\n".join(parts), _CSS, _SCRIPT)

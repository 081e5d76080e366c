"""The token spans of a dashboard against a naive rendering: every hostile token text escaped."""

from __future__ import annotations

import html

from mechscope.viz.dashboard import shade, token_spans
from mechscope.viz.html import display_token

HOSTILE = ["<script>alert(1)</script>", '" onmouseover="x', "</textarea>", "a\x00b", "\u202eevil", "'\n\t&amp;"]


def naive(tokens, values, texts, limit, center, label):
    out = []
    for i, (tok, value) in enumerate(zip(tokens, values, strict=True)):
        if tok < 0:
            continue
        text = texts[tok]
        cls = "tok center" if i == center else "tok"
        title = html.escape(f"{text!r} {label} {value:.4g}", quote=True)
        out.append(
            f'<span class="{cls}" style="background:{shade(value, limit)}" title="{title}">'
            f"{html.escape(display_token(text), quote=True)}</span>"
        )
    return "".join(out)


def test_token_spans_escape_every_text_as_the_naive_rendering_does():
    tokens = [0, 1, -1, 2, 3, 4, 5, 0]
    values = [0.5, -1.25, 0.0, 3e-5, 2.0, float("-inf"), 7.0, 0.0]
    for label in ("act", 'at"tr<'):
        got = token_spans(tokens, values, HOSTILE.__getitem__, 2.0, center=3, label=label)
        assert got == naive(tokens, values, HOSTILE, 2.0, 3, label)
        assert "<script>" not in got and '" onmouseover' not in got and "</textarea>" not in got

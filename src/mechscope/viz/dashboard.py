"""Feature dashboards: one self-contained HTML page per feature, and an index page.

A page shows the feature's statistics, its activation histogram (inline SVG), the tokens it
boosts and suppresses, its nearest features, the heads' shares (``hook_z`` SAEs), the top
examples and the quantile sections, each token shaded by the feature's activation with the
value on hover; for ``hook_z`` SAEs a second line shades each context token by its direct
attribution as a source position. Records are read by attribute (a
`mechscope.features.FeatureRecord` or anything shaped like it); every token text is
HTML-escaped, nothing is fetched when a page opens.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable, Sequence

from mechscope.viz.html import display_token, page

TokenText = Callable[[int], str]
Link = Callable[[str, int], str]

CSS = """
.stats { display: flex; gap: 1.5em; flex-wrap: wrap; margin-bottom: 1em; }
.stats div { background: #f4f4f4; padding: 4px 10px; border-radius: 4px; }
.row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
table.effects { border-collapse: collapse; font-size: 13px; }
table.effects td { padding: 1px 8px; }
.pos { color: #1f77b4; } .neg { color: #d62728; }
.example { line-height: 1.8; margin: 2px 0; white-space: nowrap; overflow-x: auto; }
.example .value { display: inline-block; width: 5.5em; color: #555; font-size: 12px; }
.dfa { opacity: 0.9; font-size: 12px; }
.tok.center { outline: 1px solid #333; }
h3 { font-size: 1em; margin: 1.2em 0 0.3em; }
svg .bar { fill: #d62728; } svg .bar:hover { fill: #333; }
"""


def esc(text: object) -> str:
    """HTML-escape (quotes included).

    Example:
        >>> esc('<a href="x">')
        '&lt;a href=&quot;x&quot;&gt;'
    """
    return html.escape(str(text), quote=True)


def shade(value: float, limit: float, rgb: str = "214,39,40") -> str:
    """A background colour whose alpha grows with ``|value| / limit`` (blue when negative).

    Example:
        >>> shade(0.5, 1.0)
        'rgba(214,39,40,0.500)'
    """
    alpha = min(abs(value) / limit, 1.0) if limit > 0 else 0.0
    return f"rgba({rgb if value >= 0 else '31,119,180'},{alpha:.3f})"


def token_spans(tokens: Sequence[int], values: Sequence[float], token_text: TokenText, limit: float,
                center: int | None = None, label: str = "act") -> str:  # fmt: skip
    """Token spans shaded by ``values``, each with its text and value on hover (ids ``< 0`` skipped).

    Example:
        >>> token_spans([3, -1], [1.0, 0.0], lambda t: "<b>", 2.0)[-30:]
        '&#x27; act 1">&lt;b&gt;</span>'
    """
    out = []
    label = esc(label)  # a number formatted with ``.4g`` needs no escaping
    for i, (tok, value) in enumerate(zip(tokens, values, strict=True)):
        if tok < 0:
            continue
        title, shown = _escaped(token_text(tok))
        cls = "tok center" if i == center else "tok"
        out.append(
            f'<span class="{cls}" style="background:{shade(value, limit)}" '
            f'title="{title} {label} {value:.4g}">{shown}</span>'
        )
    return "".join(out)


@functools.lru_cache(maxsize=1 << 16)
def _escaped(text: str) -> tuple[str, str]:
    """A token's escaped ``repr`` (for a title) and escaped visible text, computed once per text."""
    return esc(repr(text)), esc(display_token(text))


def example_html(example, token_text: TokenText, limit: float) -> str:
    """One example: its value and its context shaded by activation (and by source attribution)."""
    line = token_spans(example.tokens, example.acts, token_text, limit, example.center)
    out = f'<div class="example"><span class="value">{example.value:.4g}</span>{line}</div>'
    if example.dfa is not None:
        dfa_limit = max((abs(v) for v in example.dfa), default=0.0)
        spans = token_spans(example.tokens, example.dfa, token_text, dfa_limit, example.center, "attribution")
        out += f'<div class="example dfa"><span class="value">sources</span>{spans}</div>'
    return out


def histogram_svg(edges: Sequence[float], counts: Sequence[int], width: int = 420, height: int = 120) -> str:
    """An inline SVG bar chart of a histogram (hover a bar for its range and count).

    Example:
        >>> histogram_svg([0.0, 1.0, 2.0], [3, 1]).count('class="bar"')
        2
    """
    if not counts:
        return "<p>never fires</p>"
    top = max(counts) or 1
    bar = width / len(counts)
    rects = "".join(
        f'<rect class="bar" x="{i * bar:.2f}" y="{height - c / top * height:.2f}" width="{max(bar - 1, 1):.2f}" '
        f'height="{c / top * height:.2f}"><title>{edges[i]:.4g} to {edges[i + 1]:.4g}: {c}</title></rect>'
        for i, c in enumerate(counts)
    )
    axis = f'<text x="0" y="{height + 14}" font-size="11">0</text>'
    axis += f'<text x="{width}" y="{height + 14}" font-size="11" text-anchor="end">{edges[-1]:.3g}</text>'
    return (
        f'<svg width="{width}" height="{height + 18}" role="img" aria-label="activation histogram">{rects}{axis}</svg>'
    )


def _effects_table(title: str, items, token_text: TokenText, cls: str) -> str:
    rows = "".join(
        f'<tr><td class="tok">{esc(display_token(token_text(int(tok))))}</td><td class="{cls}">{value:+.3f}</td></tr>'
        for tok, value in items
    )
    return f'<div><h3>{esc(title)}</h3><table class="effects">{rows}</table></div>'


def feature_page_html(
    record, token_text: TokenText, link: Link | None = None, title: str | None = None, index: str | None = None
) -> str:
    """The dashboard of one feature as a complete HTML page.

    ``token_text(id)`` gives a token's text; ``link(source, feature)`` the address of another
    feature's page (neighbours are plain text without it); ``index`` the address of the index page.

    Example:
        >>> from mechscope.features import Example, FeatureRecord
        >>> rec = FeatureRecord("s", 3, 100, 5, 2.0, 0.05, 1.0, [0.0, 1.0, 2.0], [3, 2],
        ...                     top=[Example(2.0, 7, [1, 2], [0.5, 2.0], 1)])
        >>> doc = feature_page_html(rec, lambda t: ["a", "<script>", "c"][t])
        >>> "&lt;script&gt;" in doc and "<script>alert" not in doc
        True
    """
    r = record
    limit = r.max if r.max > 0 else max((max(e.acts) for e in r.top), default=1.0)
    stats = "".join(
        f"<div>{esc(k)}: <b>{v}</b></div>"
        for k, v in (
            ("density", f"{r.density:.4%}"), ("fires on", f"{r.fire_count:,} of {r.n_tokens:,} tokens"),
            ("max", f"{r.max:.4g}"), ("mean when firing", f"{r.mean_active:.4g}"),
        )
    )  # fmt: skip
    parts = [f'<p><a href="{esc(index)}">all features</a></p>'] if index else []
    parts += [f'<div class="stats">{stats}</div>', '<div class="row">']
    parts.append(f"<div><h3>Activation histogram</h3>{histogram_svg(r.hist_edges, r.hist_counts)}</div>")
    if r.logits_up:
        parts.append(_effects_table("Boosted tokens", r.logits_up, token_text, "pos"))
        parts.append(_effects_table("Suppressed tokens", r.logits_down, token_text, "neg"))
    if r.neighbours:
        items = []
        for feature, cos in r.neighbours:
            name = f"#{int(feature)}"
            ref = f'<a href="{esc(link(r.source, int(feature)))}">{name}</a>' if link else name
            items.append(f"<tr><td>{ref}</td><td>{cos:.3f}</td></tr>")
        parts.append(
            f'<div><h3>Nearest features (decoder cosine)</h3><table class="effects">{"".join(items)}</table></div>'
        )
    if r.head_shares:
        bars = "".join(
            f'<tr><td>head {h}</td><td><span style="display:inline-block;background:#d62728;height:10px;'
            f'width:{share * 200:.1f}px"></span> {share:.1%}</td></tr>'
            for h, share in enumerate(r.head_shares)
        )
        parts.append(f'<div><h3>Head shares of the decoder</h3><table class="effects">{bars}</table></div>')
    parts.append("</div>")
    top = "".join(example_html(e, token_text, limit) for e in r.top)
    parts.append(f'<h3>Top activations</h3><div id="top-examples">{top}</div>')
    for i, examples in enumerate(r.quantiles):
        if not examples:
            continue
        low, high = r.quantile_edges[i], r.quantile_edges[i + 1]
        share = 100 / max(len(r.quantiles), 1)
        body = "".join(example_html(e, token_text, limit) for e in examples)
        parts.append(f"<h3>Quantile {i + 1} (about {share:.0f}% of firing tokens; {low:.3g} to {high:.3g})</h3>{body}")
    heading = title or f"{r.source} feature {r.feature}"
    return page(heading, "\n".join(parts), CSS)


INDEX_SCRIPT = """
const rows = DATA.features;
const body = document.getElementById('index-body');
const query = document.getElementById('q');
const lo = document.getElementById('min-density'), hi = document.getElementById('max-density');
let sortKey = 'feature', sortDir = 1;
function cell(text, cls) {
  const td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; return td;
}
function render() {
  const q = query.value, qn = Number(q);
  const min = lo.value === '' ? -1 : Number(lo.value), max = hi.value === '' ? 2 : Number(hi.value);
  const shown = rows.filter(r => r.density >= min && r.density <= max && (q === '' ||
      (q.trim() !== '' && !isNaN(qn) && r.feature === qn) || r.tokens.some(t => t === q || t.trim() === q.trim())));
  shown.sort((a, b) => (a[sortKey] < b[sortKey] ? -1 : a[sortKey] > b[sortKey] ? 1 : 0) * sortDir);
  body.replaceChildren();
  for (const r of shown.slice(0, 2000)) {
    const tr = document.createElement('tr'); tr.className = 'feature-row'; tr.dataset.feature = r.feature;
    const a = document.createElement('a'); a.href = r.href; a.textContent = r.source + ' #' + r.feature;
    const td = document.createElement('td'); td.appendChild(a); tr.appendChild(td);
    tr.appendChild(cell((r.density * 100).toFixed(4) + '%')); tr.appendChild(cell(r.max.toPrecision(4)));
    tr.appendChild(cell(r.tokens.map(t => JSON.stringify(t)).join('  '), 'tok'));
    body.appendChild(tr);
  }
  document.getElementById('count').textContent = shown.length + ' of ' + rows.length + ' features';
}
document.querySelectorAll('th[data-key]').forEach(th => th.addEventListener('click', () => {
  sortDir = sortKey === th.dataset.key ? -sortDir : 1; sortKey = th.dataset.key; render(); }));
[query, lo, hi].forEach(el => el.addEventListener('input', render));
render();
"""

INDEX_CSS = """
input { margin-right: 1em; } th[data-key] { cursor: pointer; text-decoration: underline; }
table.index { border-collapse: collapse; font-size: 13px; } table.index td { padding: 1px 10px; }
"""


def feature_index_html(rows: Sequence[dict], title: str = "Features") -> str:
    """An index page: search by token text or feature id, filter by density, sort by column.

    ``rows`` are dicts with ``source``, ``feature``, ``density``, ``max``, ``tokens`` (the top
    example tokens' texts) and ``href``; they travel as JSON and are written with ``textContent``.

    Example:
        >>> doc = feature_index_html([{"source": "s", "feature": 0, "density": 0.1, "max": 1.0,
        ...                             "tokens": ["</script><b>"], "href": "f0.html"}])
        >>> "</script><b>" in doc
        False
    """
    body = (
        '<div><input id="q" placeholder="token text or feature id" size="30">'
        'density from <input id="min-density" size="8" placeholder="0"> to '
        '<input id="max-density" size="8" placeholder="1"> <span id="count"></span></div>'
        '<table class="index"><thead><tr><th data-key="feature">feature</th><th data-key="density">density</th>'
        '<th data-key="max">max</th><th>top tokens</th></tr></thead><tbody id="index-body"></tbody></table>'
    )
    return page(title, body, INDEX_CSS, INDEX_SCRIPT, data={"features": list(rows)})

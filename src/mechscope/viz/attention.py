"""Interactive attention-pattern view: one heatmap per head, hover to see source and destination."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.html import display_token, json_number, page

_CSS = """
#heads button { margin: 2px; padding: 3px 8px; border: 1px solid #888; background: #f4f4f4; cursor: pointer; }
#heads button.on { background: #1f5fbf; color: #fff; border-color: #1f5fbf; }
#wrap { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin-top: 1em; }
#panel { flex: 0 1 auto; min-width: 0; max-width: 62vw; }
#scroll { overflow: auto; max-width: 100%; max-height: 78vh; }
#grid { border-collapse: collapse; font: var(--font, 11px) ui-monospace, monospace; }
#grid td { width: var(--cell, 16px); height: var(--cell, 16px); min-width: var(--cell, 16px); padding: 0;
  border: var(--gap, 1px) solid #fff; }
#grid td.bad { background: repeating-linear-gradient(45deg, #bbb 0 2px, #fff 2px 4px) !important; }
#grid th { font-weight: normal; white-space: pre; padding: 0 4px; max-width: 12em; overflow: hidden;
  text-overflow: ellipsis; }
#grid th.col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; max-height: 10em;
  padding: 2px 0; width: var(--cell, 16px); max-width: var(--cell, 16px); line-height: var(--cell, 16px); }
.axis { font-size: 12px; color: #444; margin: 2px 0; }
#legend { display: flex; align-items: center; gap: 6px; font-size: 12px; color: #444; margin: 6px 0; }
#legend .bar { width: 160px; height: 12px; background: linear-gradient(to right, rgba(31,95,191,0), rgb(31,95,191));
  border: 1px solid #aaa; }
#legend .badkey { width: 12px; height: 12px; border: 1px solid #aaa;
  background: repeating-linear-gradient(45deg, #bbb 0 2px, #fff 2px 4px); }
#textpanel { flex: 1 1 20em; min-width: 16em; max-width: 50em; }
#text { line-height: 1.9; }
#text .tok { cursor: pointer; white-space: pre-wrap; }
#text { overflow-wrap: anywhere; }
"""

_SCRIPT = """
const tip = document.getElementById('mechscope-tip');
const grid = document.getElementById('grid'), text = document.getElementById('text');
const heads = document.getElementById('heads');
const n = DATA.tokens.length;
// cells shrink with the number of tokens so that the grid (about half the window) stays beside the
// text; past ~200 tokens at 4 px a cell the grid scrolls inside its own box
const avail = Math.max(240, Math.min(0.5 * (window.innerWidth || 1200), 900) - 110);
const cell = Math.max(4, Math.min(16, Math.floor(avail / Math.max(n, 1)) - (n > 40 ? 0 : 2)));
grid.style.setProperty('--cell', cell + 'px');
grid.style.setProperty('--gap', (cell >= 10 ? 1 : 0) + 'px');
grid.style.setProperty('--font', Math.max(6, Math.min(11, cell - 1)) + 'px');
let current = 0, focus = null;
// weights arrive as numbers, or as the strings "NaN", "Infinity", "-Infinity" (JSON has no such numbers)
function finite(w) { return typeof w === 'number' && Number.isFinite(w); }
function colour(w) { const a = Math.max(0, Math.min(1, w)); return `rgba(31,95,191,${a})`; }
function shown(w) { return finite(w) ? w.toFixed(4) : String(w); }
function showTip(ev, msg) { tip.textContent = msg; tip.style.display = 'block';
  tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; }
function hideTip() { tip.style.display = 'none'; }
function buildGrid() {
  grid.replaceChildren();
  const header = grid.insertRow(); header.appendChild(document.createElement('th'));
  for (let k = 0; k < n; k++) { const th = document.createElement('th'); th.className = 'col';
    th.textContent = DATA.tokens[k]; th.title = `[${k}] ${DATA.tokens[k]}`; header.appendChild(th); }
  for (let q = 0; q < n; q++) {
    const row = grid.insertRow(); const th = document.createElement('th');
    th.textContent = DATA.tokens[q]; th.title = `[${q}] ${DATA.tokens[q]}`; row.appendChild(th);
    for (let k = 0; k < n; k++) { const td = row.insertCell(); td.dataset.q = q; td.dataset.k = k;
      td.addEventListener('mousemove', ev => { const w = DATA.patterns[current][q][k];
        showTip(ev, `${DATA.heads[current]}\\ndestination [${q}] ${JSON.stringify(DATA.tokens[q])}` +
                    `\\nsource      [${k}] ${JSON.stringify(DATA.tokens[k])}\\nattention   ${shown(w)}`); });
      td.addEventListener('mouseleave', hideTip); }
  }
}
function buildText() {
  text.replaceChildren();
  DATA.tokens.forEach((t, i) => { const s = document.createElement('span'); s.className = 'tok'; s.textContent = t;
    s.addEventListener('mouseenter', () => { focus = i; paint(); });
    s.addEventListener('mouseleave', () => { focus = null; paint(); });
    text.appendChild(s); });
}
function paint() {
  const p = DATA.patterns[current];
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) { const td = grid.rows[q + 1].cells[k + 1], w = p[q][k];
    td.className = finite(w) ? '' : 'bad'; td.style.background = finite(w) ? colour(w) : ''; }
  Array.from(text.children).forEach((s, k) => { const w = focus === null ? null : p[focus][k];
    s.style.background = w === null ? '' : (finite(w) ? colour(w) : '#bbb');
    s.style.outline = focus === k ? '2px solid #d33' : ''; });
  Array.from(heads.children).forEach((b, h) => b.className = h === current ? 'on' : '');
  const bad = p.reduce((c, row) => c + row.filter(w => !finite(w)).length, 0);
  document.getElementById('badcount').textContent = bad ? `${bad} cells NaN or infinite` : '';
}
DATA.heads.forEach((label, h) => { const b = document.createElement('button'); b.textContent = label;
  b.addEventListener('click', () => { current = h; paint(); }); heads.appendChild(b); });
buildGrid(); buildText(); paint();
"""

_BODY = """<div id="heads"></div>
<div id="legend"><span>attention 0</span><span class="bar"></span><span>1</span>
<span class="badkey"></span><span>NaN / infinite</span><span id="badcount"></span></div>
<div id="wrap"><div id="panel"><div class="axis">columns: source (key) position &rarr;</div>
<div class="axis">rows: destination (query) position &darr;</div>
<div id="scroll"><table id="grid"></table></div></div>
<div id="textpanel"><div class="axis">hover a token to colour what it attends to</div><div id="text"></div></div></div>
<div id="mechscope-tip"></div>"""


def attention_heads_html(
    pattern: Float[Tensor, "head query_pos key_pos"],
    str_tokens: Sequence[str],
    head_labels: Sequence[str] | None = None,
    title: str = "Attention patterns",
) -> str:
    """A self-contained HTML page showing attention patterns, one head at a time.

    Pick a head with the buttons; hover a cell to see the destination (query) and source (key)
    tokens and the weight; hover a token in the text to colour the tokens it attends to. A legend
    gives the colour scale; NaN and infinite weights are hatched grey and named in the tooltip.
    Cells shrink with the number of tokens, so the grid keeps to about half the window beside the
    text (past about 200 tokens it scrolls in its own box); on a narrow window the text wraps below.
    ``pattern`` is ``[head, query_pos, key_pos]`` (or ``[query_pos, key_pos]``) for one prompt,
    e.g. ``cache["pattern", layer][0]``. Token text is escaped; no network is needed to view it.

    Example:
        >>> _, cache = model.run_with_cache(tokens)
        >>> doc = attention_heads_html(cache["pattern", 1][0], ["a", "<b>", "c", "d"])
        >>> doc.startswith("<!DOCTYPE html>") and "<b>" not in doc
        True
    """
    pattern = torch.as_tensor(pattern).detach()
    if pattern.dim() == 2:
        pattern = pattern[None]
    if pattern.dim() != 3 or pattern.shape[1] != pattern.shape[2]:
        raise InputError(f"pattern must be [head, query_pos, key_pos] for one prompt, got {list(pattern.shape)}")
    tokens = [display_token(str(t)) for t in str_tokens]
    if len(tokens) != pattern.shape[-1]:
        raise InputError(f"got {len(tokens)} tokens for a pattern over {pattern.shape[-1]} positions")
    labels = (
        [str(label) for label in head_labels]
        if head_labels is not None
        else [f"head {h}" for h in range(pattern.shape[0])]
    )
    if len(labels) != pattern.shape[0]:
        raise InputError(f"got {len(labels)} head labels for {pattern.shape[0]} heads")
    data = {
        "tokens": tokens,
        "heads": labels,
        "patterns": [[[json_number(w) for w in row] for row in head] for head in pattern.float().cpu().tolist()],
    }
    return page(title, _BODY, _CSS, _SCRIPT, data)

"""Interactive attention-pattern view: one heatmap per head, hover to see source and destination."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.html import display_token, page

_CSS = """
#heads button { margin: 2px; padding: 3px 8px; border: 1px solid #888; background: #f4f4f4; cursor: pointer; }
#heads button.on { background: #1f5fbf; color: #fff; border-color: #1f5fbf; }
#wrap { display: flex; gap: 2em; align-items: flex-start; margin-top: 1em; }
#grid { border-collapse: collapse; font: 11px ui-monospace, monospace; }
#grid td { width: 16px; height: 16px; padding: 0; border: 1px solid #fff; }
#grid th { font-weight: normal; white-space: pre; padding: 0 4px; }
#grid th.col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
#text { max-width: 40em; line-height: 1.9; }
#text .tok { cursor: pointer; }
"""

_SCRIPT = """
const tip = document.getElementById('mechscope-tip');
const grid = document.getElementById('grid'), text = document.getElementById('text');
const heads = document.getElementById('heads');
const n = DATA.tokens.length;
let current = 0, focus = null;
function colour(w) { const a = Math.max(0, Math.min(1, w)); return `rgba(31,95,191,${a})`; }
function showTip(ev, msg) { tip.textContent = msg; tip.style.display = 'block';
  tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px'; }
function hideTip() { tip.style.display = 'none'; }
function buildGrid() {
  grid.replaceChildren();
  const header = grid.insertRow(); header.appendChild(document.createElement('th'));
  for (let k = 0; k < n; k++) { const th = document.createElement('th'); th.className = 'col';
    th.textContent = DATA.tokens[k]; header.appendChild(th); }
  for (let q = 0; q < n; q++) {
    const row = grid.insertRow(); const th = document.createElement('th');
    th.textContent = DATA.tokens[q]; row.appendChild(th);
    for (let k = 0; k < n; k++) { const td = row.insertCell(); td.dataset.q = q; td.dataset.k = k;
      td.addEventListener('mousemove', ev => { const w = DATA.patterns[current][q][k];
        showTip(ev, `${DATA.heads[current]}\\ndestination [${q}] ${JSON.stringify(DATA.tokens[q])}` +
                    `\\nsource      [${k}] ${JSON.stringify(DATA.tokens[k])}\\nattention   ${w.toFixed(4)}`); });
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
  for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) grid.rows[q + 1].cells[k + 1].style.background = colour(p[q][k]);
  Array.from(text.children).forEach((s, k) => { s.style.background = focus === null ? '' : colour(p[focus][k]);
    s.style.outline = focus === k ? '2px solid #d33' : ''; });
  Array.from(heads.children).forEach((b, h) => b.className = h === current ? 'on' : '');
}
DATA.heads.forEach((label, h) => { const b = document.createElement('button'); b.textContent = label;
  b.addEventListener('click', () => { current = h; paint(); }); heads.appendChild(b); });
buildGrid(); buildText(); paint();
"""


def attention_heads_html(
    pattern: Float[Tensor, "head query_pos key_pos"],
    str_tokens: Sequence[str],
    head_labels: Sequence[str] | None = None,
    title: str = "Attention patterns",
) -> str:
    """A self-contained HTML page showing attention patterns, one head at a time.

    Pick a head with the buttons; hover a cell to see the destination (query) and source (key)
    tokens and the weight; hover a token in the text to colour the tokens it attends to.
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
    labels = [str(label) for label in head_labels] if head_labels is not None else [f"head {h}" for h in range(pattern.shape[0])]
    if len(labels) != pattern.shape[0]:
        raise InputError(f"got {len(labels)} head labels for {pattern.shape[0]} heads")
    data = {
        "tokens": tokens,
        "heads": labels,
        "patterns": [[[round(float(w), 4) for w in row] for row in head] for head in pattern.float().cpu()],
    }
    body = '<div id="heads"></div>\n<div id="wrap"><table id="grid"></table><div id="text"></div></div>\n<div id="mechscope-tip"></div>'
    return page(title, body, _CSS, _SCRIPT, data)

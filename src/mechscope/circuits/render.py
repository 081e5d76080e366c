"""Drawing a circuit: a self-contained SVG (and an HTML page around it), Graphviz ``.dot`` text, a PNG.

Nodes sit in rows by where they act, from the embeddings at the bottom to the logits at the top
(one row per attention layer and per MLP that the circuit touches); heads are spread along their
row by index. An edge runs from its sender to the component that reads it, coloured by what it
reads (query, key, value, MLP input, logits) and as wide as its ``|score|``. No Graphviz build is
needed: the layout is computed here and written as SVG, or drawn with matplotlib for the PNG.
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mechscope.circuits.circuit import Circuit
from mechscope.viz.html import page, save_html

COLOURS = {"q": "#1f77b4", "k": "#2ca02c", "v": "#9467bd", "mlp": "#7f7f7f", "logits": "#d62728"}
OFFSET = {"q": -10.0, "k": 0.0, "v": 10.0, "mlp": 0.0, "logits": 0.0}  # where an edge meets its reader
ROW, WIDTH, MARGIN = 70, 900, 40


@dataclass(frozen=True)
class Layout:
    """Node positions ``{name: (x, y)}`` and edges ``(sender, target node, input, score)``."""

    nodes: dict[str, tuple[float, float]]
    edges: list[tuple[str, str, str, float]]
    height: float


def _stage(circuit: Circuit, node: str) -> tuple[int, float]:
    """(row stage, order within the row) of a node name."""
    if node in ("input", "pos"):
        return 0, float(node == "pos")
    if node == "logits":
        return 2 * circuit.graph.n_layers + 1, 0.0
    if node.startswith("m"):
        return 2 * int(node[1:]) + 2, 0.0
    layer, rest = node[1:].split(".", 1)
    if rest.startswith("kv"):  # a key-value head sits after the heads of its group
        size = circuit.graph.n_heads // circuit.graph.n_kv_heads
        return 2 * int(layer) + 1, (int(rest[2:]) + 1) * size - 0.5
    return 2 * int(layer) + 1, float(rest[1:])


def layout(circuit: Circuit) -> Layout:
    """Where each node of the circuit goes (see the module docstring).

    Example:
        >>> from mechscope.circuits import Graph
        >>> lay = layout(Circuit.from_edges(Graph.of(model), ["a0.h1->m1", "m1->logits"]))
        >>> sorted(lay.nodes), lay.edges[0][:3]
        (['a0.h1', 'logits', 'm1'], ('a0.h1', 'm1', 'mlp'))
    """
    edges = []
    for index in circuit.edges.nonzero().flatten().tolist():
        sender, receiver = circuit.graph.edge_names[index].split("->")
        target, _, which = receiver.partition("<")
        kind = which.rstrip(">") if which else ("logits" if receiver == "logits" else "mlp")
        edges.append((sender, target, kind, float(circuit.scores[index])))
    rows: dict[int, list[tuple[float, str]]] = {}
    for node in circuit.nodes():
        stage, order = _stage(circuit, node)
        rows.setdefault(stage, []).append((order, node))
    stages = sorted(rows)
    height = 2 * MARGIN + ROW * max(0, len(stages) - 1)
    nodes = {}
    for rank, stage in enumerate(stages):
        members = sorted(rows[stage])
        y = height - MARGIN - rank * ROW
        for i, (_, node) in enumerate(members):
            nodes[node] = (MARGIN + (WIDTH - 2 * MARGIN) * (i + 1) / (len(members) + 1), y)
    return Layout(nodes, edges, height)


def _width(score: float, largest: float) -> float:
    if math.isnan(score) or largest <= 0:
        return 1.5
    return 0.8 + 5.2 * abs(score) / largest


def to_svg(circuit: Circuit) -> str:
    """The circuit as one SVG element (inline styles, a ``<title>`` tooltip on every edge and node).

    Example:
        >>> from mechscope.circuits import Graph
        >>> svg = to_svg(Circuit.from_edges(Graph.of(model), ["a0.h1->m1", "m1->logits"]))
        >>> svg.startswith("<svg") and svg.count("<line") == 2
        True
    """
    lay = layout(circuit)
    scores = [abs(s) for *_, s in lay.edges if not math.isnan(s)]
    largest = max(scores, default=0.0)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{lay.height:.0f}" '
        f'viewBox="0 0 {WIDTH} {lay.height:.0f}" font-family="sans-serif" font-size="11">'
    ]
    for sender, target, kind, score in sorted(lay.edges, key=lambda e: 0 if math.isnan(e[3]) else abs(e[3])):
        (x1, y1), (x2, y2) = lay.nodes[sender], lay.nodes[target]
        x2 += OFFSET[kind]
        tip = html.escape(f"{sender} -> {target} <{kind}>  score {score:.4g}")
        dash = "" if math.isnan(score) or score >= 0 else ' stroke-dasharray="5,3"'
        parts.append(
            f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2 + 9:.1f}" stroke="{COLOURS[kind]}" '
            f'stroke-width="{_width(score, largest):.2f}" stroke-opacity="0.7"{dash}><title>{tip}</title></line>'
        )
    for node, (x, y) in lay.nodes.items():
        w = 8 + 6.5 * len(node)
        parts.append(
            f'<g><title>{html.escape(node)}</title><rect x="{x - w / 2:.1f}" y="{y - 9:.1f}" width="{w:.1f}" '
            f'height="18" rx="4" fill="#fff" stroke="#333"/><text x="{x:.1f}" y="{y + 4:.1f}" '
            f'text-anchor="middle">{html.escape(node)}</text></g>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def to_dot(circuit: Circuit) -> str:
    """Graphviz ``.dot`` text of the circuit (edges coloured by the input they read).

    Example:
        >>> from mechscope.circuits import Graph
        >>> print(to_dot(Circuit.from_edges(Graph.of(model), ["m1->logits"])).splitlines()[2])
          "m1" -> "logits" [color="#d62728", label="nan"];
    """
    lines = ["digraph circuit {", "  rankdir=BT;"]
    for sender, target, kind, score in layout(circuit).edges:
        lines.append(f'  "{sender}" -> "{target}" [color="{COLOURS[kind]}", label="{score:.3g}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def circuit_html(circuit: Circuit, title: str | None = None, extra: str = "") -> str:
    """A self-contained page: the SVG graph, a legend, the settings and the edges by ``|score|``.

    Example:
        >>> from mechscope.circuits import Graph
        >>> doc = circuit_html(Circuit.from_edges(Graph.of(model), ["m1->logits"]))
        >>> "<svg" in doc and "<script src" not in doc
        True
    """
    legend = " ".join(
        f'<span style="color:{colour}">&#9644; {html.escape(kind)}</span>' for kind, colour in COLOURS.items()
    )
    settings = ", ".join(f"{html.escape(str(k))}={html.escape(str(v))}" for k, v in circuit.settings.items())
    ranked = [i for i in circuit.ranking().tolist() if circuit.edges[i]]
    rows = "\n".join(
        f"<tr><td>{html.escape(circuit.graph.edge_names[i])}</td><td>{float(circuit.scores[i]):.4g}</td></tr>"
        for i in ranked
    )
    body = (
        f"<p>{html.escape(circuit.model_name)}: {circuit.n_edges} of {circuit.graph.n_edges} edges, "
        f"method {html.escape(circuit.method)}{'; ' + settings if settings else ''}</p>\n"
        f"<p>reads: {legend} (dashed: negative score)</p>\n{to_svg(circuit)}\n{extra}\n"
        f"<table><tr><th>edge</th><th>score</th></tr>\n{rows}\n</table>"
    )
    css = "table { border-collapse: collapse; font-size: 0.85em; } td, th { padding: 2px 8px; text-align: left; }"
    return page(title or f"circuit ({circuit.method})", body, css)


def save_circuit_html(circuit: Circuit, path: str | os.PathLike, title: str | None = None, extra: str = "") -> Path:
    """Write `circuit_html` to ``path``."""
    return save_html(circuit_html(circuit, title, extra), path)


def save_circuit_png(circuit: Circuit, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Draw the layout of `to_svg` with matplotlib into a PNG.

    Example:
        >>> import tempfile, pathlib
        >>> from mechscope.circuits import Graph
        >>> circuit = Circuit.from_edges(Graph.of(model), ["m1->logits"])
        >>> out = save_circuit_png(circuit, pathlib.Path(tempfile.mkdtemp()) / "c.png")
        >>> out.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    lay = layout(circuit)
    largest = max((abs(s) for *_, s in lay.edges if not math.isnan(s)), default=0.0)
    fig, ax = plt.subplots(figsize=(WIDTH / dpi, max(2.0, lay.height / dpi)), dpi=dpi)
    for sender, target, kind, score in lay.edges:
        (x1, y1), (x2, y2) = lay.nodes[sender], lay.nodes[target]
        x2 += OFFSET[kind]
        style = "--" if not math.isnan(score) and score < 0 else "-"
        ax.plot([x1, x2], [y1, y2 + 9], style, color=COLOURS[kind], alpha=0.7, linewidth=_width(score, largest))
    for node, (x, y) in lay.nodes.items():
        ax.text(x, y, node, ha="center", va="center", fontsize=8, bbox=dict(boxstyle="round", fc="white", ec="#333"))
    ax.set_xlim(0, WIDTH)
    ax.set_ylim(lay.height, 0)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path

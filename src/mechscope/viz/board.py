"""Othello boards as pictures: discs, a probe's per-square reading, and the model's move scores.

`board_html` renders one board as a self-contained HTML table (inline CSS, escaped text);
`boards_page` puts several side by side in one page; `board_png` draws the same board with
matplotlib. Each takes tensors only:

- ``discs [square]``: +1 black, -1 white, 0 empty;
- ``probe [square, 3]``: class probabilities of a board probe (empty, then the two colours,
  e.g. mine/theirs); each square shows the most likely class and its probability;
- ``moves [square]``: the model's move probabilities (empty squares are shaded by them, and the
  legal ones outlined when ``legal`` is given).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.viz.html import page, save_html

CSS = """
.boards { display: flex; flex-wrap: wrap; gap: 24px; font-family: sans-serif; }
.board-card h3 { font-size: 14px; margin: 4px 0; }
table.othello { border-collapse: collapse; background: #2e7d32; }
table.othello td { width: 42px; height: 42px; border: 1px solid #1b5e20; text-align: center; position: relative;
  font-size: 10px; color: #fff; }
table.othello th { font-size: 11px; color: #555; font-weight: normal; }
.disc { width: 30px; height: 30px; border-radius: 50%; margin: auto; }
.disc.black { background: #111; } .disc.white { background: #f5f5f5; }
.legal { outline: 2px solid #ffeb3b; outline-offset: -3px; }
.probe { position: absolute; bottom: 1px; right: 2px; font-size: 9px; color: #ffeb3b; text-shadow: 0 0 2px #000; }
"""


def _checked(discs: Tensor, probe: Tensor | None, moves: Tensor | None, legal: Tensor | None) -> int:
    n = discs.shape[-1]
    size = int(round(n**0.5))
    if discs.dim() != 1 or size * size != n:
        raise InputError(f"discs must be one square board [square], got shape {tuple(discs.shape)}")
    for name, value, shape in (("probe", probe, (n, 3)), ("moves", moves, (n,)), ("legal", legal, (n,))):
        if value is not None and tuple(value.shape) != shape:
            raise InputError(f"{name} must have shape {shape} for a {size}x{size} board, got {tuple(value.shape)}")
    return size


def board_html(
    discs: Int[Tensor, " square"],
    *,
    probe: Float[Tensor, "square 3"] | None = None,
    probe_classes: Sequence[str] = ("empty", "mine", "theirs"),
    moves: Float[Tensor, " square"] | None = None,
    legal: Bool[Tensor, " square"] | None = None,
    title: str = "",
) -> str:
    """One board as an HTML fragment (a titled table).

    Example:
        >>> discs = torch.zeros(36, dtype=torch.long); discs[14], discs[21] = 1, -1
        >>> fragment = board_html(discs, moves=torch.full((36,), 1 / 36), title="<start>")
        >>> "&lt;start&gt;" in fragment, fragment.count('class="disc black"')
        (True, 1)
    """
    size = _checked(discs, probe, moves, legal)
    top = float(moves.max()) if moves is not None and float(moves.max()) > 0 else 1.0
    rows = ["<tr><th></th>" + "".join(f"<th>{c + 1}</th>" for c in range(size)) + "</tr>"]
    for r in range(size):
        cells = [f"<th>{'ABCDEFGH'[r]}</th>"]
        for c in range(size):
            s = r * size + c
            colour = int(discs[s])
            style, classes, hover = "", [], [f"{'ABCDEFGH'[r]}{c + 1}"]
            inner = (
                '<div class="disc black"></div>'
                if colour == 1
                else '<div class="disc white"></div>'
                if colour == -1
                else ""
            )
            if moves is not None:
                p = float(moves[s])
                hover.append(f"move p={p:.3f}")
                if colour == 0 and p > 0:
                    style = f' style="background: rgba(255, 152, 0, {min(1.0, p / top):.2f})"'
            if legal is not None and bool(legal[s]):
                classes.append("legal")
                hover.append("legal")
            if probe is not None:
                k = int(probe[s].argmax())
                name = probe_classes[k]
                hover.append(f"probe: {name} {float(probe[s, k]):.2f}")
                inner += f'<span class="probe">{html.escape(name[:1].upper())}{float(probe[s, k]):.2f}</span>'
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f'<td{cls}{style} title="{html.escape(", ".join(hover))}">{inner}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    return f'<div class="board-card">{heading}<table class="othello">{"".join(rows)}</table></div>'


def boards_page(fragments: Sequence[str], title: str, intro: str = "") -> str:
    """A whole HTML page with `board_html` fragments side by side.

    Example:
        >>> doc = boards_page([board_html(torch.zeros(36, dtype=torch.long))], "boards")
        >>> doc.startswith("<!DOCTYPE html>")
        True
    """
    body = (f"<p>{html.escape(intro)}</p>" if intro else "") + f'<div class="boards">{"".join(fragments)}</div>'
    return page(title, body, css=CSS)


def save_boards_html(fragments: Sequence[str], path: str | os.PathLike, title: str, intro: str = "") -> Path:
    """Write `boards_page` to ``path``."""
    return save_html(boards_page(fragments, title, intro), path)


def board_png(
    discs: Int[Tensor, " square"],
    path: str | os.PathLike,
    *,
    probe: Float[Tensor, "square 3"] | None = None,
    probe_classes: Sequence[str] = ("empty", "mine", "theirs"),
    moves: Float[Tensor, " square"] | None = None,
    legal: Bool[Tensor, " square"] | None = None,
    title: str = "",
    dpi: int = 100,
) -> Path:
    """The board of `board_html` as a PNG (matplotlib); written atomically; returns the path.

    Example:
        >>> import tempfile
        >>> out = board_png(torch.zeros(36, dtype=torch.long), Path(tempfile.mkdtemp()) / "b.png")
        >>> out.read_bytes()[:4]
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    size = _checked(discs, probe, moves, legal)
    fig, ax = plt.subplots(figsize=(0.6 * size + 0.6, 0.6 * size + 0.9))
    top = float(moves.max()) if moves is not None and float(moves.max()) > 0 else 1.0
    for s in range(size * size):
        r, c = divmod(s, size)
        shade = float(moves[s]) / top if moves is not None and int(discs[s]) == 0 else 0.0
        face = (0.18 + 0.82 * shade, 0.49 + 0.11 * shade, 0.2 * (1 - shade))
        ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=face, edgecolor="#1b5e20"))
        if legal is not None and bool(legal[s]):
            ax.add_patch(plt.Rectangle((c + 0.06, r + 0.06), 0.88, 0.88, fill=False, edgecolor="#ffeb3b", lw=2))
        if int(discs[s]) != 0:
            ax.add_patch(plt.Circle((c + 0.5, r + 0.5), 0.38, color="#111" if int(discs[s]) == 1 else "#f5f5f5"))
        if probe is not None:
            k = int(probe[s].argmax())
            ax.text(c + 0.95, r + 0.92, f"{probe_classes[k][:1].upper()}{float(probe[s, k]):.2f}", ha="right",
                    va="bottom", fontsize=6, color="#ffeb3b")  # fmt: skip
    ax.set_xlim(0, size)
    ax.set_ylim(size, 0)
    ax.set_xticks([c + 0.5 for c in range(size)], [str(c + 1) for c in range(size)])
    ax.set_yticks([r + 0.5 for r in range(size)], list("ABCDEFGH"[:size]))
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["board_html", "board_png", "boards_page", "save_boards_html"]

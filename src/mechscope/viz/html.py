"""Building blocks of self-contained HTML views: one page, inline CSS and JS, no network.

Token text never reaches the page as markup: it is either HTML-escaped or carried as JSON inside
a ``<script type="application/json">`` block (with ``<``, ``>`` and ``&`` escaped) and written
into the page with ``textContent`` by the inline script.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from pathlib import Path

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(data: object) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>`` can appear in it).

    Example:
        >>> script_json(["</script>"])
        '["\\\\u003c/script\\\\u003e"]'
    """
    text = json.dumps(data, ensure_ascii=False)
    for char, escaped in _JSON_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


def display_token(token: str) -> str:
    """A token's text made visible: newlines and tabs as symbols (spaces are kept).

    Example:
        >>> display_token(" a\\n")
        ' a↵'
    """
    return token.replace("\n", "↵").replace("\t", "⇥")


def page(title: str, body: str, css: str = "", script: str = "", data: object = None) -> str:
    """A complete HTML document; ``data`` is embedded as JSON readable by ``script`` via ``DATA``.

    Example:
        >>> doc = page("<b>x</b>", "<p>hi</p>")
        >>> "&lt;b&gt;x&lt;/b&gt;" in doc and "<script src" not in doc
        True
    """
    data_block = ""
    if data is not None:
        data_block = (
            f'<script type="application/json" id="mechscope-data">{script_json(data)}</script>\n'
            "<script>const DATA = JSON.parse(document.getElementById('mechscope-data').textContent);</script>\n"
        )
    script_block = f"<script>\n{script}\n</script>\n" if script else ""
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>\n{_BASE_CSS}{css}\n</style>\n</head>\n<body>\n"
        f"<h2>{html.escape(title)}</h2>\n{body}\n{data_block}{script_block}</body></html>\n"
    )


def save_html(document: str, path: str | os.PathLike) -> Path:
    """Write ``document`` to ``path`` atomically (temporary file, then rename) and return the path.

    Example:
        >>> import tempfile, pathlib
        >>> out = save_html(page("t", ""), pathlib.Path(tempfile.mkdtemp()) / "view.html")
        >>> out.read_text().startswith("<!DOCTYPE html>")
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(document)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_BASE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { font-size: 1.1em; }
.tok { font-family: ui-monospace, monospace; white-space: pre; padding: 1px 0; border-radius: 2px; }
#mechscope-tip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 4px 8px;
  border-radius: 4px; font: 12px ui-monospace, monospace; white-space: pre; display: none; z-index: 10; }
"""

"""Building blocks of self-contained HTML views: one page, inline CSS and JS, no network.

Token text never reaches the page as markup: it is either HTML-escaped or carried as JSON inside
a ``<script type="application/json">`` block (with ``<``, ``>`` and ``&`` escaped) and written
into the page with ``textContent`` by the inline script.
"""

from __future__ import annotations

import html
import json
import math
import os
import secrets
from pathlib import Path

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_number(value: float, digits: int | None = 4) -> float | str:
    """A float for JSON: rounded to ``digits``, or ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    (JSON has no such numbers; the views' scripts test for strings).

    Example:
        >>> [json_number(v) for v in (0.123456, float("nan"), float("-inf"))]
        [0.1235, 'NaN', '-Infinity']
    """
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value if digits is None else round(value, digits)


def _finite_json(data: object) -> object:
    if isinstance(data, float):
        return json_number(data, None)
    if isinstance(data, dict):
        return {key: _finite_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_json(value) for value in data]
    return data


def script_json(data: object) -> str:
    """JSON that is safe inside a ``<script>`` element (no ``</script>`` can appear in it) and
    valid for ``JSON.parse`` (NaN and infinities become the strings of `json_number`).

    Example:
        >>> script_json(["</script>"])
        '["\\\\u003c/script\\\\u003e"]'
        >>> script_json([1.5, float("nan")])
        '[1.5, "NaN"]'
    """
    text = json.dumps(_finite_json(data), ensure_ascii=False, allow_nan=False)
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
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>\n{_BASE_CSS}{css}\n</style>\n</head>\n<body>\n"
        f"<h2>{html.escape(title)}</h2>\n{body}\n{data_block}{script_block}</body></html>\n"
    )


def temporary_path(path: str | os.PathLike) -> Path:
    """Create an empty, unique temporary file beside ``path`` and return its name.

    Unlike ``tempfile.mkstemp`` (always mode 0600) its mode follows the umask, like any new file,
    so the file renamed onto ``path`` gets ordinary permissions (0644 under umask 022).

    Example:
        >>> import tempfile, pathlib
        >>> tmp = temporary_path(pathlib.Path(tempfile.mkdtemp()) / "view.html")
        >>> tmp.name.startswith(".view.html.") and tmp.stat().st_size == 0
        True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file and a rename, so the
    file is never seen half written; its mode follows the umask. Returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> out = write_atomic(pathlib.Path(tempfile.mkdtemp()) / "a.json", "{}")
        >>> plain = out.with_name("plain.json"); _ = plain.write_text("{}")  # an ordinary new file
        >>> out.read_text(), out.stat().st_mode == plain.stat().st_mode
        ('{}', True)
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_html(document: str, path: str | os.PathLike) -> Path:
    """Write ``document`` to ``path`` atomically (temporary file, then rename) and return the path.

    Example:
        >>> import tempfile, pathlib
        >>> out = save_html(page("t", ""), pathlib.Path(tempfile.mkdtemp()) / "view.html")
        >>> out.read_text().startswith("<!DOCTYPE html>")
        True
    """
    return write_atomic(path, document)


_BASE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h2 { font-size: 1.1em; }
.tok { font-family: ui-monospace, monospace; white-space: pre; padding: 1px 0; border-radius: 2px; }
#mechscope-tip { position: fixed; pointer-events: none; background: #222; color: #fff; padding: 4px 8px;
  border-radius: 4px; font: 12px ui-monospace, monospace; white-space: pre; display: none; z-index: 10; }
"""

"""``mechscope browse DB``: a local feature browser served with Flask.

Pages: the index (search by token text, feature id and density; sort by density or maximum),
a server-side search (``/search``), each feature's dashboard (``/feature/SOURCE/ID``), **test a
prompt** (``/prompt``: which features fire on each token) and **steer** (``/steer``: add or
ablate a feature and compare the next-token distributions). Test-a-prompt and steering need the
model and the sources' weights; without them those pages say how to provide them.

The server binds 127.0.0.1 by default and refuses a non-loopback address unless
``--allow-remote`` is given; requests whose ``Host`` header is not a loopback name are refused
too (against DNS rebinding). Token texts reach pages only escaped or through ``textContent``.
"""

from __future__ import annotations

import argparse
import ipaddress
import threading

from mechscope.errors import ConfigError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")

PAGE_SCRIPT = """
async function post(url, body) {
  const r = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
                              body: JSON.stringify(body)});
  const data = await r.json(); if (!r.ok) throw new Error(data.error || r.statusText); return data;
}
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls; return e; }
function showError(err) { const box = document.getElementById('error'); box.textContent = String(err.message || err); }
"""

PROMPT_SCRIPT = """
document.getElementById('run').addEventListener('click', async () => {
  const out = document.getElementById('result'); out.replaceChildren();
  document.getElementById('error').textContent = '';
  try {
    const data = await post('/api/prompt', {text: document.getElementById('text').value,
                                            source: document.getElementById('source').value});
    const table = el('table', undefined, 'effects'); table.id = 'prompt-table';
    data.tokens.forEach((tok, i) => {
      const tr = el('tr'); tr.className = 'prompt-token'; tr.dataset.pos = i;
      tr.appendChild(el('td', JSON.stringify(tok), 'tok'));
      const td = el('td');
      for (const [f, v] of data.top[i]) {
        const a = el('a', '#' + f + ' ' + v.toPrecision(6), 'fire'); a.href = data.links[f];
        a.dataset.feature = f; a.dataset.value = v; td.appendChild(a); td.appendChild(document.createTextNode('  '));
      }
      tr.appendChild(td); table.appendChild(tr);
    });
    out.appendChild(table);
  } catch (err) { showError(err); }
});
"""

STEER_SCRIPT = """
function dist(title, rows) {
  const box = el('div'); box.appendChild(el('h3', title)); const t = el('table', undefined, 'effects');
  for (const [id, text, p] of rows) { const tr = el('tr'); tr.appendChild(el('td', JSON.stringify(text), 'tok'));
    tr.appendChild(el('td', (100 * p).toFixed(2) + '%')); t.appendChild(tr); }
  box.appendChild(t); return box;
}
document.getElementById('run').addEventListener('click', async () => {
  const out = document.getElementById('result'); out.replaceChildren();
  document.getElementById('error').textContent = '';
  try {
    const data = await post('/api/steer', {text: document.getElementById('text').value,
      source: document.getElementById('source').value, feature: Number(document.getElementById('feature').value),
      mode: document.getElementById('mode').value, coefficient: Number(document.getElementById('coefficient').value)});
    const row = el('div', undefined, 'row'); row.appendChild(dist('Before', data.before));
    row.appendChild(dist('After', data.after)); out.appendChild(row);
    out.appendChild(el('p', 'KL(before || after) = ' + data.kl.toPrecision(4), 'kl'));
  } catch (err) { showError(err); }
});
"""


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback bind address unless ``allow_remote``.

    Example:
        >>> check_host("127.0.0.1", False)
        >>> check_host("0.0.0.0", False)
        Traceback (most recent call last):
        mechscope.errors.ConfigError: refusing to serve on 0.0.0.0: ...
    """
    if allow_remote or host in LOOPBACK_NAMES:
        return
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return
    except ValueError:
        pass
    raise ConfigError(
        f"refusing to serve on {host}: it is not a loopback address, so other machines could reach the browser; "
        "use --host 127.0.0.1 (the default), or pass --allow-remote to serve on it anyway"
    )


def make_app(db_path, model=None, sources: dict | None = None, allow_remote: bool = False):
    """The Flask application serving the database at ``db_path``; ``sources`` maps source names
    to SAEs or `mechscope.features.FeatureSource` s for test-a-prompt and steering.

    Example:
        >>> app = make_app("features.db")  # doctest: +SKIP
        >>> app.test_client().get("/").status_code  # doctest: +SKIP
        200
    """
    from flask import Flask, abort, jsonify, request
    from werkzeug.exceptions import HTTPException

    from mechscope.errors import MechscopeError
    from mechscope.features import FeatureDB, SAESource
    from mechscope.features.live import prompt_features, steer
    from mechscope.features.site import index_rows
    from mechscope.sae import SAE
    from mechscope.viz.dashboard import esc, feature_index_html, feature_page_html
    from mechscope.viz.html import page

    db = FeatureDB(db_path)
    live = {name: SAESource(s, name) if isinstance(s, SAE) else s for name, s in (sources or {}).items()}
    lock = threading.Lock()
    app = Flask("mechscope.browse")

    def link(source: str, feature: int) -> str:
        from urllib.parse import quote

        return f"/feature/{quote(source, safe='')}/{int(feature)}"

    def nav() -> str:
        links = (("/", "index"), ("/search", "search"), ("/prompt", "test a prompt"), ("/steer", "steer"))
        return "<p>" + " · ".join(f'<a href="{href}">{text}</a>' for href, text in links) + "</p>"

    def live_form(extra: str) -> str:
        if model is None or not live:
            return (
                "<p>Test-a-prompt and steering need the model and the sources' weights: start the browser with "
                "<code>mechscope browse DB --model NAME --sae PATH</code>.</p>"
            )
        options = "".join(f'<option value="{esc(n)}">{esc(n)}</option>' for n in live)
        return (
            f'<div><select id="source">{options}</select></div><textarea id="text" rows="4" cols="80">'
            f'</textarea>{extra}<div><button id="run">Run</button></div><div id="error" class="neg"></div>'
            '<div id="result"></div>'
        )

    @app.before_request
    def only_loopback_hosts():
        host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") else "[::1]"
        if not allow_remote and host not in LOOPBACK_NAMES:
            abort(403)

    @app.errorhandler(MechscopeError)
    def mechscope_error(exc):
        return jsonify(error=str(exc)), 400

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if request.path.startswith("/api/"):
            return jsonify(error=exc.description), exc.code
        return page(f"{exc.code} {exc.name}", f"{nav()}<p>{esc(exc.description)}</p>"), exc.code

    @app.get("/favicon.ico")
    def favicon():
        return "", 204

    @app.get("/")
    def index():
        title = f"Features of {db.meta().get('model_name', 'a model')}"
        doc = feature_index_html(index_rows(db, link), title)
        return doc.replace("<body>\n", f"<body>\n{nav()}", 1)

    @app.get("/feature/<source>/<int:feature>")
    def feature_page(source: str, feature: int):
        try:
            record = db.feature(feature, source)
        except MechscopeError as exc:
            abort(404, str(exc))
        return feature_page_html(record, db.token_text, link=link, index="/")

    @app.get("/search")
    def search():
        args = request.args
        query = {
            "token": args.get("token") or None, "boosts": args.get("boosts") or None,
            "feature": int(args["feature"]) if args.get("feature", "").strip().isdigit() else None,
            "min_density": float(args["min_density"]) if args.get("min_density") else None,
            "max_density": float(args["max_density"]) if args.get("max_density") else None,
            "order": args.get("order", "density"),
        }  # fmt: skip
        rows = db.search(**query, limit=200) if any(v is not None for k, v in query.items() if k != "order") else []
        form = "".join(
            f'<label>{esc(k)} <input name="{esc(k)}" value="{esc(args.get(k, ""))}"></label> '
            for k in ("token", "boosts", "feature", "min_density", "max_density")
        )
        body = "".join(
            f'<tr class="result"><td><a href="{esc(link(r["source"], r["feature"]))}">{esc(r["source"])} '
            f"#{r['feature']}</a></td><td>{r['density']:.4%}</td><td>{r['max']:.4g}</td></tr>"
            for r in rows
        )
        html = (
            f'{nav()}<form method="get">{form}<button>Search</button></form>'
            f'<table class="effects" id="results">{body}</table>'
        )
        return page("Search features", html, "table.effects td { padding: 1px 10px; }")

    @app.get("/prompt")
    def prompt_page():
        return page("Test a prompt", nav() + live_form(""), ".tok { white-space: pre; } a.fire { margin-right: 1em; }",
                    PAGE_SCRIPT + PROMPT_SCRIPT)  # fmt: skip

    @app.get("/steer")
    def steer_page():
        extra = (
            '<div>feature <input id="feature" type="number" value="0" min="0"> '
            '<select id="mode"><option value="add">add</option><option value="ablate">ablate</option></select> '
            'coefficient <input id="coefficient" type="number" value="4" step="any"></div>'
        )
        css = ".row { display: flex; gap: 3em; } .tok { white-space: pre; }"
        return page("Steer with a feature", nav() + live_form(extra), css, PAGE_SCRIPT + STEER_SCRIPT)

    def live_source(name: str):
        if model is None or not live:
            abort(409, "the browser was started without the model and the sources' weights")
        if name not in live:
            abort(404, f"no live source {name!r}; sources: {sorted(live)}")
        return live[name]

    @app.post("/api/prompt")
    def api_prompt():
        body = request.get_json(force=True, silent=True) or {}
        source = live_source(str(body.get("source", "")))
        text = str(body.get("text", ""))
        if not text:
            abort(400, "type a prompt first")
        with lock:
            result = prompt_features(model, source, text)
        top = result.top(8)
        links = {f: link(source.name, f) for row in top for f, _ in row}
        return jsonify(tokens=result.str_tokens, top=top, links=links)

    @app.post("/api/steer")
    def api_steer():
        body = request.get_json(force=True, silent=True) or {}
        source = live_source(str(body.get("source", "")))
        text = str(body.get("text", ""))
        if not text:
            abort(400, "type a prompt first")
        with lock:
            out = steer(model, source, text, int(body.get("feature", 0)), mode=str(body.get("mode", "add")),
                        coefficient=float(body.get("coefficient", 4.0)))  # fmt: skip
        return jsonify(out)

    return app


class Server:
    """A browser app served on a background thread (``with Server(app) as url: ...``).

    Example:
        >>> with Server(make_app("features.db")) as url:  # doctest: +SKIP
        ...     print(url)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False) -> None:
        from werkzeug.serving import make_server

        check_host(host, allow_remote)
        self.server = make_server(host, port, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


def cli_browse(args: argparse.Namespace) -> int:
    """``mechscope browse DB [--model NAME] [--sae PATH ...] [--host H] [--port P] [--allow-remote]``."""
    from mechscope.cli.features import load_live

    check_host(args.host, args.allow_remote)
    model, sources = load_live(args.db, args.model, args.sae, args.device, args.no_model)
    app = make_app(args.db, model, sources, allow_remote=args.allow_remote)
    server = Server(app, args.host, args.port, args.allow_remote)
    print(f"serving {args.db} on {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def add_browse_parser(
    sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
) -> None:
    """Register ``mechscope browse`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_browse_parser(parser.add_subparsers())
        >>> args = parser.parse_args(["browse", "features.db"])
        >>> args.host, args.port, args.func.__name__
        ('127.0.0.1', 8765, 'cli_browse')
    """
    p = sub.add_parser(
        "browse",
        help="serve a feature database in a local browser",
        description="Serve a feature database on this machine: index, search, feature pages, test a prompt, steer.",
        formatter_class=formatter_class,
    )
    p.add_argument("db", help="the feature database (made by `mechscope features harvest`)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback only unless --allow-remote)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback bind address and Host header")
    p.add_argument(
        "--model", default=None, help="model for test-a-prompt and steering (None: the one the database names)"
    )
    p.add_argument(
        "--sae", action="append", default=None, help="SAE folder or file (None: the paths the database names)"
    )
    p.add_argument("--device", default=None, help="e.g. cpu or cuda")
    p.add_argument("--no-model", action="store_true", help="serve the pages only, without loading the model")
    p.set_defaults(func=cli_browse)

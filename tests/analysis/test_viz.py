"""HTML views: hostile token text is escaped, pages are self-contained, embedded data round-trips."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser

import pytest
import torch

import mechscope as ms
from mechscope.viz import attention_heads_html, colored_tokens_html, save_html

HOSTILE = ['<script>alert("x")</script>', '" onmouseover="alert(1)', "it's", "&amp;", "</script><b>", "a\nb"]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.scripts, self.token_texts = [], [], []
        self._in_script = self._in_tok = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if tag == "span" and dict(attrs).get("class") == "tok":
            self._in_tok = True
            self.token_texts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False
        if tag == "span":
            self._in_tok = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts[-1] += data
        elif self._in_tok:
            self.token_texts[-1] += data


def _parse(doc: str) -> _Collector:
    parser = _Collector()
    parser.feed(doc)
    parser.close()
    return parser


def _check_safe(doc: str, n_scripts: int) -> _Collector:
    parsed = _parse(doc)
    assert [t for t, _ in parsed.tags].count("script") == n_scripts
    for tag, attrs in parsed.tags:
        assert tag in {
            "html",
            "head",
            "meta",
            "title",
            "style",
            "body",
            "h2",
            "div",
            "table",
            "script",
            "span",
            "select",
            "option",
        }
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        assert "src" not in attrs and "href" not in attrs
    assert "http" not in doc and "<link" not in doc and "@import" not in doc
    markup = re.sub(r'(<script type="application/json"[^>]*>).*?(</script>)', r"\1\2", doc, flags=re.S)
    for bad in ("<script>alert", "</script><b>", '" onmouseover'):
        assert bad not in markup  # token text never appears as markup or attribute text
    assert "<script>alert" not in doc and "</script><b>" not in doc  # nor can it close the JSON block
    return parsed


def test_attention_view_escapes_and_round_trips():
    pattern = torch.softmax(torch.randn(3, 6, 6), -1).tril()
    doc = attention_heads_html(pattern, HOSTILE, head_labels=["L0H0", "<i>H1</i>", "L0H2"], title="<title>")
    parsed = _check_safe(doc, n_scripts=3)
    data = json.loads(parsed.scripts[0])
    assert data["tokens"] == [t.replace("\n", "↵") for t in HOSTILE]
    assert data["heads"][1] == "<i>H1</i>" and "<i>" not in doc
    assert torch.allclose(torch.tensor(data["patterns"]), pattern, atol=1e-4)
    assert "&lt;title&gt;" in doc


def test_token_view_escapes_and_round_trips():
    values = torch.tensor([[0.5, -1.0, 0.0, 2.0, 0.1, -0.3], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    doc = colored_tokens_html(HOSTILE, values, series_labels=["neuron <7>", "flat"])
    parsed = _check_safe(doc, n_scripts=1)
    assert parsed.token_texts == [t.replace("\n", "↵") for t in HOSTILE] * 2
    titles = [attrs["title"] for tag, attrs in parsed.tags if tag == "span"]
    assert titles[0] == f"[0] {HOSTILE[0]!r}: 0.5" and titles[1].startswith("[1] ")
    assert "neuron &lt;7&gt;" in doc
    colours = re.findall(r"background:rgba\((\d+,\d+,\d+),([\d.]+)\)", doc)
    assert colours[3] == ("214,39,40", "1.000") and colours[1] == ("31,119,180", "0.500")


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_inline_scripts_are_valid_javascript(tmp_path):
    pattern = torch.softmax(torch.randn(2, 4, 4), -1)
    for doc in (attention_heads_html(pattern, HOSTILE[:4]), colored_tokens_html(HOSTILE[:4], torch.ones(2, 4))):
        for i, script in enumerate(_parse(doc).scripts):
            if script.lstrip().startswith(("{", "[")):
                continue  # the JSON data block
            path = tmp_path / f"s{i}.js"
            path.write_text(script)
            subprocess.run(["node", "--check", str(path)], check=True, capture_output=True)


def test_view_input_errors(tmp_path):
    with pytest.raises(ms.InputError, match="3 tokens"):
        attention_heads_html(torch.ones(2, 4, 4), ["a", "b", "c"])
    with pytest.raises(ms.InputError, match="head, query_pos, key_pos"):
        attention_heads_html(torch.ones(2, 4, 5), ["a"] * 4)
    with pytest.raises(ms.InputError, match="pos=2"):
        colored_tokens_html(["a", "b"], torch.ones(3))
    with pytest.raises(ms.InputError, match="series labels"):
        colored_tokens_html(["a", "b"], torch.ones(2, 2), series_labels=["x"])
    out = save_html(attention_heads_html(torch.ones(4, 4).tril(), ["a"] * 4), tmp_path / "sub" / "view.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>") and list(out.parent.iterdir()) == [out]


_DOM_STUB = """
class El {
  constructor(tag) { this.tagName = tag; this.children = []; this.cells = []; this.rows = [];
    this.style = { setProperty(k, v) { this[k] = v; } };
    this.dataset = {}; this.listeners = {}; this.textContent = ''; this.className = '';
    this.classList = { toggle: () => {} }; }
  appendChild(c) { this.children.push(c); if (c.tagName === 'th' || c.tagName === 'td') this.cells.push(c); return c; }
  replaceChildren() { this.children = []; this.rows = []; this.cells = []; }
  addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
  fire(type) { (this.listeners[type] || []).forEach(fn => fn({clientX: 0, clientY: 0})); }
  insertRow() { const r = new El('tr'); this.rows.push(r); this.children.push(r); return r; }
  insertCell() { return this.appendChild(new El('td')); }
}
const ids = {};
const window = { innerWidth: 1200 };
const document = {
  getElementById: id => ids[id] || (ids[id] = new El(id === 'grid' ? 'table' : 'div')),
  createElement: tag => new El(tag),
  querySelectorAll: () => [],
};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_attention_view_script_runs(tmp_path):
    """Run the page's script against a minimal DOM: cells are painted per head, hovering shows both tokens."""
    pattern = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]], [[1.0, 0, 0], [1.0, 0, 0], [0.0, 1.0, 0]]])
    doc = attention_heads_html(pattern, ["a", "<b>", '"c"'], head_labels=["H0", "H1"])
    scripts = _parse(doc).scripts
    driver = (
        _DOM_STUB
        + f"ids['mechscope-data'] = {{textContent: {json.dumps(scripts[0])}}};\n"
        + scripts[1]
        + "\n"
        + scripts[2]
        + "\n"
        + """
const g = ids['grid'], hd = ids['heads'], tp = ids['mechscope-tip'], tx = ids['text'];
const out = {head0: g.rows[3].cells[2].style.background};
hd.children[1].fire('click');
out.head1 = g.rows[3].cells[2].style.background;
g.rows[3].cells[2].fire('mousemove');
out.tip = tp.textContent;
tx.children[2].fire('mouseenter');
out.text = tx.children.map(s => s.style.background);
out.tokens = tx.children.map(s => s.textContent);
console.log(JSON.stringify(out));
"""
    )
    path = tmp_path / "driver.js"
    path.write_text(driver)
    out = json.loads(subprocess.run(["node", str(path)], check=True, capture_output=True, text=True).stdout)
    assert out["head0"] == "rgba(31,95,191,0.3)" and out["head1"] == "rgba(31,95,191,1)"
    assert out["tip"].splitlines() == ["H1", 'destination [2] "\\"c\\""', 'source      [1] "<b>"', "attention   1.0000"]
    assert out["text"] == ["rgba(31,95,191,0)", "rgba(31,95,191,1)", "rgba(31,95,191,0)"]
    assert out["tokens"] == ["a", "<b>", '"c"']


# ---------------------------------------------------------------------- PNG export backends
def _cannot_run(*args, **kwargs):
    raise ImportError("No module named 'kaleido'")


@pytest.fixture
def heatmap_without_kaleido(monkeypatch):
    """A heatmap whose plotly export fails as it does on a machine without kaleido."""
    from mechscope.viz.heatmap import layer_head_heatmap

    fig = layer_head_heatmap(torch.randn(2, 3), "heads")
    monkeypatch.setattr(fig, "write_image", _cannot_run, raising=False)
    return fig


def test_explicit_kaleido_that_cannot_run_raises(heatmap_without_kaleido, tmp_path):
    from mechscope.viz.png import save_png

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, not a warning and None
        with pytest.raises(ms.ConfigError, match=r"backend='kaleido' cannot run \(No module named 'kaleido'\)") as info:
            save_png(heatmap_without_kaleido, tmp_path / "x.png", backend="kaleido")
    assert "pip install 'kaleido>=1'" in str(info.value) and "backend='matplotlib'" in str(info.value)
    assert not list(tmp_path.glob("*"))  # no temporary file left behind


def test_explicit_matplotlib_that_cannot_run_raises(heatmap_without_kaleido, tmp_path, monkeypatch):
    from mechscope.viz import png

    monkeypatch.setattr(png, "_matplotlib_png", _cannot_run)
    with pytest.raises(ms.ConfigError, match="backend='matplotlib' cannot run.*pip install matplotlib"):
        png.save_png(heatmap_without_kaleido, tmp_path / "x.png", backend="matplotlib")
    assert not list(tmp_path.glob("*"))


def test_auto_backend_falls_back_to_matplotlib_silently(heatmap_without_kaleido, tmp_path):
    from mechscope.viz.png import save_png

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = save_png(heatmap_without_kaleido, tmp_path / "x.png")
    assert out == tmp_path / "x.png" and out.read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ---------------------------------------------------------------------- NaN and infinities, scales, file modes
def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_attention_view_with_nan_and_inf_is_valid_json():
    pattern = torch.tensor([[[1.0, 0.0], [float("nan"), float("inf")]]])
    doc = attention_heads_html(pattern, ["a", "b"])
    data = _strict_json(_parse(doc).scripts[0])
    assert data["patterns"] == [[[1.0, 0.0], ["NaN", "Infinity"]]]
    assert "NaN / infinite" in doc and "source (key)" in doc and "destination (query)" in doc


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_attention_view_script_shows_nan_cells(tmp_path):
    pattern = torch.tensor([[[1.0, 0.0, 0.0], [float("nan"), 0.5, 0.0], [0.2, float("-inf"), 0.8]]])
    scripts = _parse(attention_heads_html(pattern, ["a", "b", "c"])).scripts
    driver = (
        _DOM_STUB
        + f"ids['mechscope-data'] = {{textContent: {json.dumps(scripts[0])}}};\n"
        + scripts[1]
        + "\n"
        + scripts[2]
        + """
const g = ids['grid'], tp = ids['mechscope-tip'];
g.rows[2].cells[1].fire('mousemove');
console.log(JSON.stringify({classes: g.rows.slice(1).map(r => r.cells.slice(1).map(c => c.className)),
  good: g.rows[2].cells[2].style.background, tip: tp.textContent, count: ids['badcount'].textContent}));
"""
    )
    path = tmp_path / "driver.js"
    path.write_text(driver)
    out = json.loads(subprocess.run(["node", str(path)], check=True, capture_output=True, text=True).stdout)
    assert out["classes"] == [["", "", ""], ["bad", "", ""], ["", "bad", ""]]
    assert out["good"] == "rgba(31,95,191,0.5)" and out["tip"].splitlines()[-1] == "attention   NaN"
    assert out["count"] == "2 cells NaN or infinite"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_a_long_attention_view_loads_in_a_browser(tmp_path):
    n = 120
    pattern = torch.softmax(torch.randn(1, n, n, generator=torch.Generator().manual_seed(0)), -1)
    pattern[0, 3, 1] = float("nan")
    path = save_html(attention_heads_html(pattern, [f" t{i}" for i in range(n)]), tmp_path / "long.html")
    dom = subprocess.run(
        ["chromium", "--headless", "--disable-gpu", "--no-sandbox", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert dom.count("<tr>") == n + 1  # the script ran and built every row
    assert "1 cells NaN or infinite" in dom and 'class="bad"' in dom


def test_token_view_with_nan_and_inf_colours_the_rest():
    doc = colored_tokens_html(["a", "b", "c", "d"], torch.tensor([0.5, float("nan"), float("inf"), -1.0]))
    colours = re.findall(r"background:rgba\((\d+,\d+,\d+),([\d.]+)\)", doc)
    assert colours == [("214,39,40", "0.500"), ("214,39,40", "1.000"), ("31,119,180", "1.000")]
    assert doc.count("repeating-linear-gradient") == 1  # the NaN token is hatched
    assert "2 NaN or infinite" in doc and "max |finite value| 1" in doc
    titles = [attrs["title"] for tag, attrs in _parse(doc).tags if tag == "span"]
    assert titles[1] == "[1] 'b': nan" and titles[2] == "[2] 'c': inf"


def test_heatmap_with_nan_and_inf_keeps_a_finite_scale():
    from mechscope.viz.heatmap import layer_head_heatmap

    fig = layer_head_heatmap(torch.tensor([[1.0, float("nan")], [float("-inf"), -2.0]]), "heads")
    trace = fig.data[0]
    assert trace.zmin == -2.0 and trace.zmax == 2.0
    assert [list(row) for row in trace.z] == [[1.0, None], [None, -2.0]]
    assert [list(row) for row in trace.text] == [["1.0000", "nan"], ["-inf", "-2.0000"]]
    assert "2 NaN or infinite cells" in fig.layout.title.text


def _captured_imshow(monkeypatch, figure, tmp_path):
    from matplotlib.axes import Axes

    from mechscope.viz.png import save_png

    seen = {}
    real = Axes.imshow

    def imshow(self, z, **kwargs):
        seen.update(kwargs, masked=int(z.mask.sum()))
        return real(self, z, **kwargs)

    monkeypatch.setattr(Axes, "imshow", imshow)
    save_png(figure, tmp_path / "f.png", backend="matplotlib")
    return seen


def test_png_colour_ranges_follow_the_html(monkeypatch, tmp_path):
    from mechscope.cli.figures import heatmap_figure
    from mechscope.viz.heatmap import layer_head_heatmap

    norms = [[0.4, 1.3], [0.9, float("nan")]]  # sequential, never negative: 0 .. max, as in the HTML
    seq = _captured_imshow(monkeypatch, heatmap_figure(norms, "norms", colorscale="Blues", zmid=None), tmp_path)
    assert (seq["vmin"], seq["vmax"]) == (0.0, 1.3) and seq["masked"] == 1
    phases = [[0, 1], [2, 1]]
    seq = _captured_imshow(monkeypatch, heatmap_figure(phases, "phases", colorscale="Viridis", zmid=None), tmp_path)
    assert (seq["vmin"], seq["vmax"]) == (0.0, 2.0)
    div = _captured_imshow(monkeypatch, layer_head_heatmap(torch.tensor([[0.5, -1.5]]), "z"), tmp_path)
    assert (div["vmin"], div["vmax"]) == (-1.5, 1.5)
    import plotly.graph_objects as go

    plain = _captured_imshow(monkeypatch, go.Figure(go.Heatmap(z=[[0.5, 2.0]])), tmp_path)  # plotly: data range
    assert (plain["vmin"], plain["vmax"]) == (0.5, 2.0)


def test_written_files_have_ordinary_modes(tmp_path):
    import os

    from mechscope.cli.figures import heatmap_figure, write_report
    from mechscope.viz.heatmap import layer_head_heatmap, save_heatmaps
    from mechscope.viz.png import save_png

    previous = os.umask(0o022)
    try:
        files = [
            save_html(colored_tokens_html(["a"], torch.ones(1)), tmp_path / "v.html"),
            save_heatmaps([layer_head_heatmap(torch.ones(2, 2), "x")], tmp_path / "h.html", "h"),
            save_png(layer_head_heatmap(torch.ones(2, 2), "x"), tmp_path / "h.png", backend="matplotlib"),
            *write_report(tmp_path / "r" / "report.html", "r", [("a map", heatmap_figure([[1, 2]], "m"))], {"x": 1}),
        ]
    finally:
        os.umask(previous)
    files += list((tmp_path / "r" / "report_png").iterdir())
    assert len(files) == 6
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (tmp_path / "r" / "report_png").stat().st_mode & 0o777 == 0o755
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

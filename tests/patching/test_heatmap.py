"""Patching heatmaps: values, labels, escaping, one inlined plotly script, PNG fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import mechscope as ms
from mechscope.viz import png
from mechscope.viz.heatmap import (
    layer_head_heatmap,
    layer_pos_heatmap,
    save_heatmaps,
    save_png,
)


def test_layer_pos_heatmap_values_and_escaped_token_labels(tmp_path):
    values = torch.tensor([[0.5, -1.0, 2.0], [0.0, 3.0, -0.25]])
    tokens = ["<script>alert(1)</script>", " John", " John"]
    fig = layer_pos_heatmap(values, tokens, "resid <pre>")
    assert [list(row) for row in fig.data[0].z] == values.tolist()
    assert len(set(fig.data[0].x)) == 3  # repeated tokens stay separate columns
    assert fig.data[0].zmid == 0 and fig.data[0].zmax == 3.0 and fig.data[0].zmin == -3.0
    heads = layer_head_heatmap(torch.randn(2, 4), "heads")
    path = save_heatmaps([fig, heads], tmp_path / "report.html", "IOI <report>")
    text = path.read_text()
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)" in text
    assert "IOI &lt;report&gt;" in text and "<script src=" not in text
    assert text.count("plotly.js v") == 1  # the library is inlined once
    assert not list(tmp_path.glob("*.tmp"))


def test_layer_labels_for_a_subset_of_layers():
    fig = layer_pos_heatmap(torch.zeros(2, 3), ["a", "b", "c"], "x", layers=[0, 27])
    assert list(fig.data[0].y) == ["0", "27"]
    assert list(layer_head_heatmap(torch.zeros(2, 4), "x", layers=[3, 5]).data[0].y) == ["3", "5"]
    with pytest.raises(ms.InputError, match="3 layer labels for 2 rows"):
        layer_head_heatmap(torch.zeros(2, 4), "x", layers=[0, 1, 2])


def test_shape_errors():
    with pytest.raises(ms.InputError, match="one column per token"):
        layer_pos_heatmap(torch.zeros(2, 3), ["a", "b"], "x")
    with pytest.raises(ms.InputError, match="layer, head"):
        layer_head_heatmap(torch.zeros(2, 3, 4), "x")


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_png_export_offline_with_token_labels(tmp_path):
    tokens = ["When", " Mary", " <b>$x$</b>", "\n"]
    fig = layer_pos_heatmap(
        torch.randn(6, 4, generator=torch.Generator().manual_seed(0)),
        tokens,
        "resid <pre>",
        layers=[0, 3, 6, 9, 12, 15],
    )
    out = save_png(fig, tmp_path / "resid.png", backend="matplotlib")
    width, height = _png_size(out)
    assert (width, height) == (fig.layout.width, fig.layout.height)  # layout pixels at 100 dpi
    assert not list(tmp_path.glob("*.tmp"))
    # The default backend falls back to matplotlib when kaleido cannot run (it is not installed here).
    heads = save_png(layer_head_heatmap(torch.randn(30, 9), "heads"), tmp_path / "heads.png")
    assert heads is not None and 300 <= min(_png_size(heads)) and max(_png_size(heads)) <= 2000
    go = pytest.importorskip("plotly.graph_objects")
    lines = go.Figure([go.Scatter(x=[1, 2, 3], y=[3, 1, 2], mode="lines+markers", name="loss")])
    lines.update_layout(title="training", width=640, height=400, yaxis_type="log")
    assert _png_size(save_png(lines, tmp_path / "lines.png", backend="matplotlib")) == (640, 400)


def test_png_export_errors_and_skip(tmp_path, monkeypatch):
    go = pytest.importorskip("plotly.graph_objects")
    with pytest.raises(ms.InputError, match="heatmap"):
        save_png(go.Figure(go.Bar(x=[1], y=[2])), tmp_path / "bar.png", backend="matplotlib")
    with pytest.raises(ms.InputError, match="backend"):
        save_png(go.Figure(), tmp_path / "x.png", backend="svg")

    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(png, "_matplotlib_png", no_matplotlib)
    fig = layer_head_heatmap(torch.randn(2, 2), "x")
    monkeypatch.setattr(fig, "write_image", no_matplotlib, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert save_png(fig, tmp_path / "x.png") is None
    assert any("PNG export skipped" in str(w.message) and "pip install matplotlib" in str(w.message) for w in caught)
    assert not list(tmp_path.glob("*"))

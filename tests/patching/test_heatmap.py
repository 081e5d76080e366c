"""Patching heatmaps: values, labels, escaping, one inlined plotly script, PNG fallback."""

from __future__ import annotations

import warnings

import pytest
import torch

import mechscope as ms
from mechscope.viz.heatmap import layer_head_heatmap, layer_pos_heatmap, save_heatmaps, save_png


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


def test_png_export_writes_or_warns_clearly(tmp_path):
    fig = layer_head_heatmap(torch.randn(2, 2), "x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = save_png(fig, tmp_path / "x.png")
    if out is None:
        assert any("PNG export skipped" in str(w.message) and "kaleido" in str(w.message) for w in caught)
    else:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

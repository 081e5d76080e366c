"""The heads section of `mechscope tour`."""

from __future__ import annotations

import json
import re

import torch

from mechscope.analysis import induction_scores, repeated_random_tokens, top_heads
from mechscope.cli import build_parser
from mechscope.cli.tour import heads_section
from tests.conftest import tiny_model


def test_heads_section_prints_top_heads_and_writes_view(tmp_path, capsys):
    model = tiny_model(seed=3)
    top = heads_section(model, out_dir=tmp_path, k=3, seq_len=5, batch=2)
    out = capsys.readouterr().out
    for name in ("previous token", "duplicate token", "induction", "copy suppression"):
        assert len(top[name]) == 3 and name in out
    tokens = repeated_random_tokens(model, seq_len=5, batch=2)
    assert top["induction"] == top_heads(induction_scores(model, tokens), 3)
    doc = (tmp_path / "induction_head.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'<script type="application/json"[^>]*>(.*?)</script>', doc, re.S).group(1))
    assert data["heads"] == [top["induction"][0][0]] and data["tokens"] == [str(int(t)) for t in tokens[0]]
    layer, head = (int(x) for x in top["induction"][0][0][1:].split("H"))
    _, cache = model.run_with_cache(tokens)
    assert torch.allclose(torch.tensor(data["patterns"][0]), cache["pattern", layer][0, head], atol=1e-4)


def test_tour_flags():
    args = build_parser().parse_args(["tour", "--no-heads", "--out-dir", "views"])
    assert args.no_heads and args.out_dir == "views"
    assert not build_parser().parse_args(["tour"]).no_heads

"""The IOI tour section, on a small random model that uses the bundled tokenizer."""

from __future__ import annotations

import mechscope as ms
from mechscope.cli.tour import ioi_section


def test_ioi_section_writes_report(tmp_path, capsys):
    tokenizer = ms.load("smollm2-135m", device="cpu").tokenizer
    cfg = ms.ModelConfig(
        d_model=32,
        n_layers=4,
        n_heads=4,
        d_mlp=64,
        d_vocab=49152,
        n_ctx=32,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        n_key_value_heads=2,
        default_prepend_bos=False,
    )
    model = ms.HookedTransformer(cfg, tokenizer=tokenizer).init_weights(seed=0, std=0.3)
    path = ioi_section(model, tmp_path, n_prompts=2, top_k=3)
    text = path.read_text()
    assert path.name == "ioi_patching.html" and "AtP* top 3 heads" in text and text.count("plotly.js v") == 1
    out = capsys.readouterr().out
    assert "IOI report" in out and str(path) in out
    assert "residual stream at 2 of 4 layers" in out and "--ioi-full" in out  # layers 0 and 3
    for name in ("ioi_resid.png", "ioi_heads.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and str(tmp_path / name) in out

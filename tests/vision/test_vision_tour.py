"""``mechscope tour --vision``: the random tiny CLIP by default, or a checkpoint directory."""

from __future__ import annotations

import pytest

from mechscope.cli import build_parser
from mechscope.cli.parser import main


def test_vision_flag_parses_with_and_without_a_directory():
    parser = build_parser()
    assert parser.parse_args(["tour", "--vision"]).vision == "random"
    assert parser.parse_args(["tour", "--vision", "ckpt"]).vision == "ckpt"
    assert parser.parse_args(["tour"]).vision is None


def test_vision_tour_on_a_clip_directory_writes_its_views(clip_dir, tmp_path, capsys):
    assert main(["tour", "--vision", str(clip_dir), "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "zero-shot lens" in out and "activation patching" in out and "random weights" not in out
    for name in ("attention", "lens", "patching"):
        assert (tmp_path / f"vision-{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert "<!DOCTYPE html>" in (tmp_path / f"vision-{name}.html").read_text()


def test_vision_tour_names_a_wrong_directory(tmp_path, capsys):
    assert main(["tour", "--vision", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    assert "checkpoint directory with a config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_default_vision_tour_says_the_model_is_random(tmp_path, capsys):
    assert main(["tour", "--vision", "--out-dir", str(tmp_path)]) == 0
    assert "random weights" in capsys.readouterr().out


def test_vision_tour_on_a_vit_classifier_reads_its_classes(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path / "vit"
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        image_size=16,
        patch_size=4,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "fish"},
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    assert main(["tour", "--vision", str(folder), "--out-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "(vit)" in out and "final: " in out
    assert any(f"final: {label}" in out for label in ("cat", "dog", "fish"))

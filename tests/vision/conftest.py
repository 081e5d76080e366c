"""A tiny random CLIP checkpoint (both towers, tokenizer, image processor) and synthetic images."""

from __future__ import annotations

import pytest

from mechscope.vision import load_clip, shapes, tiny_clip
from mechscope.vision.tiny import words_of

LABELS = ["red circle", "blue square", "green triangle", "yellow cross"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    words = words_of([f"a photo of a {label}" for label in LABELS])
    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"), words, d_model=32, n_layers=2, image_size=16)


@pytest.fixture(scope="session")
def clip(clip_dir):
    return load_clip(clip_dir)


@pytest.fixture(scope="session")
def images():
    return shapes(6, size=40, seed=3)

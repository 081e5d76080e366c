"""Image inputs: every kind of image goes through the model's own image processor."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor

import mechscope as ms
from mechscope.vision import display_image, image_files, pixels, shapes


def test_every_input_kind_gives_the_processor_pixels(clip, images, tmp_path):
    model = clip.vision
    expected = AutoImageProcessor.from_pretrained(model.cfg.extra["hf_dir"])(images=images.images, return_tensors="pt")[
        "pixel_values"
    ]
    for i, image in enumerate(images.images):
        image.save(tmp_path / f"{i:02d}.png")
    arrays = [np.array(image) for image in images.images]
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in arrays]
    for given in (images.images, tmp_path, sorted(tmp_path.iterdir()), arrays, tensors, torch.stack(tensors)):
        torch.testing.assert_close(pixels(model, given), expected, atol=1e-6, rtol=0)
    assert pixels(model, images.images[0]).shape == (1, 3, 16, 16)
    assert [p.name for p in image_files(tmp_path, limit=2)] == ["00.png", "01.png"]


def test_pixels_run_the_model(clip, images):
    x = pixels(clip.vision, images.images)
    logits = clip.vision(x)
    assert logits.shape == (6, 17, clip.vision.cfg.d_vocab_out)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("no-such-file.png", "no such image file"),
        (np.zeros((4, 4, 3), dtype=np.float32) + 2.0, r"values in \[0, 1\]"),
        (torch.zeros(5, 4, 4), r"\[channel, height, width\]"),
        (3.0, "cannot read an image from float"),
        ([], "no images given"),
    ],
)
def test_bad_images_are_named(clip, bad, match):
    with pytest.raises(ms.InputError, match=match):
        pixels(clip.vision, bad)


def test_text_models_and_missing_processors_are_named(clip, tmp_path):
    with pytest.raises(ms.InputError, match="not a vision model"):
        pixels(clip.text, shapes(1, size=16).images)
    vision = clip.vision
    saved, folder = vision.image_processor, vision.cfg.extra["hf_dir"]
    try:
        del vision.image_processor
        vision.cfg.extra["hf_dir"] = str(tmp_path)
        with pytest.raises(ms.LoadError, match="no preprocessor_config.json"):
            pixels(vision, shapes(1, size=16).images)
    finally:
        vision.image_processor, vision.cfg.extra["hf_dir"] = saved, folder


def test_synthetic_shapes_are_reproducible_and_labelled():
    a, b = shapes(5, size=32, seed=7), shapes(5, size=32, seed=7)
    assert a.labels == b.labels and a.boxes == b.boxes
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))
    assert shapes(5, size=32, seed=8).labels != a.labels or shapes(5, size=32, seed=8).boxes != a.boxes
    for image, colour, box in zip(a.images, a.colours, a.boxes, strict=True):
        top, left, bottom, right = box
        centre = np.asarray(image)[(top + bottom) // 2, (left + right) // 2]
        from mechscope.vision.synthetic import COLOURS

        assert tuple(centre) == COLOURS[colour], "the shape's colour is at its centre"
    with pytest.raises(ms.InputError, match="unknown colours"):
        shapes(2, colours=("mauve",))


def test_display_image_is_the_square_the_model_sees():
    image = shapes(1, size=40, seed=0).images[0]
    shown = display_image(image, 16)
    assert shown.shape == (16, 16, 3) and 0 <= float(shown.min()) and float(shown.max()) <= 1


def test_a_tiny_clip_is_written_and_read_without_transformers_warnings(tmp_path):
    """Without torchvision, transformers warns once when ``CLIPImageProcessor`` is first looked up
    (it falls back to the PIL processor, as expected here): a fresh interpreter shows none of it."""
    script = (
        "from mechscope.vision import load_clip, pixels, shapes, tiny_clip\n"
        f"folder = tiny_clip({str(tmp_path)!r}, ['a', 'red', 'circle'], d_model=16, n_layers=1, image_size=16)\n"
        "clip = load_clip(folder)\n"
        "pixels(clip.vision, shapes(1, size=16, seed=0).images)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "transformers" not in run.stderr and "torchvision" not in run.stderr, run.stderr

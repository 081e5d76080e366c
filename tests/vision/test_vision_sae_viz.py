"""SAEs on a vision hook shown as image patches, and the overlay views."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.vision import PatchGrid, display_image, harvest, pixels, shapes, top_patches, train_vision_sae
from mechscope.viz.vision import Overlay, lens_figure, overlays_page, save_overlays_html, save_overlays_png

HOOK = "blocks.1.hook_resid_post"


def test_harvest_is_the_cache_without_the_class_token(clip, images):
    model = clip.vision
    x = pixels(model, images.images)
    acts = harvest(model, HOOK, x, batch_size=4)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=[HOOK])
    torch.testing.assert_close(acts, cache[HOOK][:, 1:])
    with pytest.raises(ms.HookNameError, match="closest"):
        harvest(model, "blocks.1.hook_resid_pots", x)


def test_sae_on_a_vision_hook_and_its_top_patches(clip):
    model = clip.vision
    x = pixels(model, shapes(24, size=32, seed=5).images)
    sae = train_vision_sae(model, HOOK, x, {"architecture": "topk", "k": 4, "d_sae": 48}, {"steps": 30}, batch_size=64)
    assert sae.cfg.hook_name == HOOK and sae.cfg.d_in == model.cfg.d_model
    acts = sae.encode(harvest(model, HOOK, x))  # [image, patch, d_sae]
    latent = int(acts.sum((0, 1)).argmax())
    best = top_patches(model, sae, x, latent, k=5)
    values = acts[..., latent].flatten().topk(5).values
    torch.testing.assert_close(torch.tensor([b.value for b in best]), values)
    grid = PatchGrid.of(model)
    for b in best:  # each record points at the patch whose activation it reports
        assert acts[b.image, b.pos - 1, latent].item() == pytest.approx(b.value)
        assert b.box == grid.box(b.pos)
    with pytest.raises(ms.InputError, match="latent 48 is out of range"):
        top_patches(model, sae, x, 48)


def test_overlay_views_escape_captions_and_write_files(tmp_path):
    image = display_image(shapes(1, size=32, seed=0).images[0], 16)
    panels = [
        Overlay(image, torch.rand(4, 4), "attention <script>alert(1)</script>"),
        Overlay(image, torch.randn(4, 4), "patching & more", box=(0, 0, 4, 4)),
    ]
    doc = overlays_page(panels, "view <title>")
    assert "<script>alert" not in doc and "&lt;script&gt;alert(1)&lt;/script&gt;" in doc
    assert doc.count('class="cell"') == 32 and "rgba(33,102,172" in doc  # a diverging panel has blue cells
    assert save_overlays_html(panels, tmp_path / "v.html", "view <title>").read_text() == doc
    png = save_overlays_png(panels, tmp_path / "v.png", "title $x$")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ms.InputError, match="does not tile"):
        Overlay(image, torch.rand(3, 3))
    fig = lens_figure(torch.zeros(3, 2), ["<a>", "b"], "lens")
    assert list(fig.data[0].x) == ["&lt;a&gt;", "b"]

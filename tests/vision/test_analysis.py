"""Analyses on images, each against its naive definition or the transformers model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel, ViTConfig, ViTForImageClassification

import mechscope as ms
from mechscope.vision import (
    PatchGrid,
    attention_grid,
    attribution_names,
    class_directions,
    direct_attribution,
    lens,
    lens_names,
    patch_images,
    pixels,
    pooled_text,
    scores,
    text_directions,
    text_tokens,
    to_patches,
)
from tests.conftest import randomize_
from tests.vision.conftest import LABELS


@pytest.fixture(scope="module")
def hf_clip(clip_dir):
    return CLIPModel.from_pretrained(clip_dir).eval()


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        image_size=16,
        patch_size=4,
        num_labels=3,
        id2label={0: "cat", 1: "dog <b>", 2: "fish"},
    )
    hf_model = randomize_(ViTForImageClassification(config), seed=1).eval()
    hf_model.save_pretrained(path)
    return hf_model, ms.load(path, device="cpu")


def test_zero_shot_directions_and_scores_match_transformers(clip, clip_dir, hf_clip, images):
    directions = text_directions(clip.text, LABELS)
    texts = [f"a photo of a {label}" for label in LABELS]
    batch = AutoTokenizer.from_pretrained(clip_dir)(texts, padding=True, return_tensors="pt")
    x = pixels(clip.vision, images.images)
    with torch.no_grad():
        text = F.normalize(hf_clip.get_text_features(**batch).pooler_output, dim=-1)
        image = F.normalize(hf_clip.get_image_features(pixel_values=x).pooler_output, dim=-1)
        ours = scores(clip.vision, clip.vision(x), directions, normalize=True)
    torch.testing.assert_close(directions, text.T, atol=1e-5, rtol=1e-5)
    tokens, mask = text_tokens(clip.text, texts)
    torch.testing.assert_close(tokens, batch["input_ids"])
    torch.testing.assert_close(mask, batch["attention_mask"])
    with torch.no_grad():
        logits, cache = clip.text.run_with_cache(tokens, attention_mask=mask, names_filter=["ln_final.hook_out"])
        torch.testing.assert_close(
            cache["ln_final.hook_out"], hf_clip.text_model(**batch).last_hidden_state, atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(F.normalize(pooled_text(clip.text, tokens, logits), dim=-1), text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, image @ text.T, atol=1e-5, rtol=1e-5)


def test_lens_final_row_is_the_model_and_earlier_rows_the_naive_lens(clip, images):
    model, directions = clip.vision, text_directions(clip.text, LABELS)
    x = pixels(model, images.images)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x, names_filter=lens_names(model))
        got = lens(model, cache, directions, normalize=True)
        assert got.shape == (model.cfg.n_layers + 1, len(images), len(LABELS))
        torch.testing.assert_close(got[-1], scores(model, logits, directions, True), atol=1e-5, rtol=1e-5)
        for layer in range(model.cfg.n_layers):  # naive: stop at the layer, finish with the final norm
            resid = model(x, stop_at_layer=layer)
            naive = F.normalize(model.unembed(model.ln_final(resid))[:, 0], dim=-1) @ directions
            torch.testing.assert_close(got[layer], naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("by", ["layer", "head"])
def test_direct_attribution_sums_to_the_scores(clip, images, normalize, by):
    model, directions = clip.vision, text_directions(clip.text, LABELS)
    x = pixels(model, images.images)
    with torch.no_grad():
        logits, cache = model.run_with_cache(x, names_filter=attribution_names(model, by))
        parts, labels = direct_attribution(model, cache, directions, normalize=normalize, by=by)
    cfg = model.cfg
    if by == "layer":
        assert labels[0] == "embed" and labels[-1] == "bias" and len(labels) == 2 * cfg.n_layers + 2
    else:
        assert labels[:2] == ["L0H0", "L0H1"] and len(labels) == cfg.n_layers * cfg.n_heads + 2
        z = cache["blocks.1.attn.hook_z"][:, 0, 3]  # head 3 of the last layer at the class token
        head = z @ model.blocks[1].attn.W_O[3]  # its write to the residual stream
        scale = cache["ln_final.hook_scale"][:, 0]
        naive = ((head - head.mean(-1, keepdim=True)) / scale * model.ln_final.w) @ model.W_U @ directions
        if normalize:
            naive = naive / model.unembed(model.ln_final(cache["blocks.1.hook_resid_post"][:, 0])).norm(dim=-1)[:, None]
        torch.testing.assert_close(parts[labels.index("L1H3")], naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.sum(0), scores(model, logits, directions, normalize), atol=1e-5, rtol=1e-5)
    assert parts[1:-1].abs().amax() > 1e-3, "the layers contribute nothing: the test could not fail"


def test_vit_classifier_lens_and_attribution(vit):
    hf_model, model = vit
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    directions, names = class_directions(model)
    assert names == ["cat", "dog <b>", "fish"]
    with torch.no_grad():
        expected = hf_model(pixel_values=x).logits
        _, cache = model.run_with_cache(x, names_filter=lens_names(model) + attribution_names(model))
        torch.testing.assert_close(lens(model, cache, directions)[-1], expected, atol=1e-4, rtol=1e-4)
        parts, _ = direct_attribution(model, cache, directions)
    torch.testing.assert_close(parts.sum(0), expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ms.InputError, match="unknown classes.*closest"):
        class_directions(model, ["dgo <b>"])


def test_patching_between_images_equals_one_forward_per_patch(clip, images):
    """The batched engine against the naive oracle: one hooked forward per (layer, position)."""
    model, directions = clip.vision, text_directions(clip.text, LABELS)
    x = pixels(model, images.images)
    base, source = x[:2], x[2:4]

    def metric(logits):
        return scores(model, logits, directions, True)[:, 1] - scores(model, logits, directions, True)[:, 0]

    got = patch_images(model, base, source, metric, layers=[0, 1], batch_size=7)
    assert got.shape == (2, 17)
    with torch.no_grad():
        _, src = model.run_with_cache(source, names_filter=lambda n: n.endswith("hook_resid_pre"))
        for layer in (0, 1):
            for pos in (0, 3, 16):
                name = f"blocks.{layer}.hook_resid_pre"

                def hook(act, *, hook, pos=pos, name=name):
                    act = act.clone()
                    act[:, pos] = src[name][:, pos]
                    return act

                naive = metric(model.run_with_hooks(base, fwd_hooks=[(name, hook)])).mean()
                torch.testing.assert_close(got[layer, pos], naive, atol=1e-5, rtol=1e-5)
    assert got.abs().max() > 1e-4, "patching changed nothing: the test could not fail"
    assert to_patches(model, got).shape == (2, 4, 4)
    region = PatchGrid.of(model).positions_in(4, 4, 12, 8)  # a pixel box: four patches
    torch.testing.assert_close(patch_images(model, base, source, metric, layers=[1], positions=region), got[1:, region])
    with pytest.raises(ms.InputError, match="positions must be"):
        patch_images(model, base, source, metric, positions=[17])
    with pytest.raises(ms.InputError, match="differ in shape"):
        patch_images(model, base, x[:3], metric)


def test_attention_grid_is_the_class_token_row(clip, images):
    model = clip.vision
    x = pixels(model, images.images)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=lambda n: n.endswith("hook_pattern"))
    grid = attention_grid(cache, 1, 2, PatchGrid.of(model))
    pattern = cache["blocks.1.attn.hook_pattern"][:, 2, 0]
    torch.testing.assert_close(grid.flatten(1), pattern[:, 1:])
    torch.testing.assert_close(grid.sum((-1, -2)) + pattern[:, 0], torch.ones(len(images)))
    with pytest.raises(ms.InputError, match="head 9 is out of range"):
        attention_grid(cache, 1, 9, PatchGrid.of(model))


def test_siglip_has_no_direct_attribution(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, image_size=8, patch_size=4
        )
    ).save_pretrained(tmp_path)
    model = ms.load(tmp_path, device="cpu")
    with pytest.raises(ms.InputError, match="not linear"):
        direct_attribution(model, None, torch.eye(16))

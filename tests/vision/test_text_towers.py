"""Text towers in the language-model tools: bidirectional attention reaches the patching engine."""

from __future__ import annotations

import pytest
import torch
from transformers import SiglipTextConfig, SiglipTextModel

import mechscope as ms
from mechscope.patching.activation import activation_patch
from tests.conftest import randomize_


def test_position_patching_on_a_bidirectional_tower_reruns_earlier_positions(tmp_path):
    """Prefix reuse assumes causal attention; a bidirectional tower must match one forward per patch."""
    config = SiglipTextConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        vocab_size=40,
        max_position_embeddings=8,
        projection_size=16,
    )
    randomize_(SiglipTextModel(config), seed=3).save_pretrained(tmp_path)
    model = ms.load(tmp_path, device="cpu")
    assert not model.cfg.causal
    gen = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 40, (2, 1, 6), generator=gen)

    def metric(logits):
        return logits[:, -1, 0]

    got = activation_patch(model, clean, corrupted, metric, "resid_pre", "pos", layers=[0], batch_size=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=["blocks.0.hook_resid_pre"])
        for pos in range(6):

            def hook(act, *, hook, pos=pos):
                act = act.clone()
                act[:, pos] = cache["blocks.0.hook_resid_pre"][:, pos]
                return act

            naive = metric(model.run_with_hooks(corrupted, fwd_hooks=[("blocks.0.hook_resid_pre", hook)]))
            torch.testing.assert_close(got[0, pos], naive[0], atol=1e-5, rtol=1e-5)
    assert (got[0] - metric(model(corrupted))).abs().max() > 1e-4, "no patch had an effect: the test could not fail"


def test_load_clip_reads_a_full_siglip_checkpoint(tmp_path):
    """Both SigLIP towers against transformers' image and text features, with the contrastive head."""
    from transformers import SiglipConfig, SiglipModel

    from mechscope.vision import load_clip, pooled_image, pooled_text

    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40)
    config = SiglipConfig(
        text_config={**tower, "vocab_size": 40, "max_position_embeddings": 8, "projection_size": 32},
        vision_config={**tower, "image_size": 16, "patch_size": 4},
    )
    hf_model = randomize_(SiglipModel(config), seed=5).eval()
    hf_model.save_pretrained(tmp_path)
    clip = load_clip(tmp_path)
    assert (clip.vision.cfg.family, clip.text.cfg.family, clip.text.tokenizer) == ("siglip_vision", "siglip_text", None)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        image = hf_model.get_image_features(pixel_values=pixels).pooler_output
        text = hf_model.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(pooled_image(clip.vision, clip.vision(pixels)), image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pooled_text(clip.text, tokens, clip.text(tokens)), text, atol=1e-4, rtol=1e-4)
    assert clip.logit_scale == hf_model.logit_scale.item() and clip.logit_bias == hf_model.logit_bias.item()
    from mechscope.vision import lens, lens_names

    directions = torch.nn.functional.normalize(torch.randn(32, 3, generator=torch.Generator().manual_seed(3)), dim=0)
    with torch.no_grad():  # the lens through the pooling head: its last row is the model's cosine
        _, cache = clip.vision.run_with_cache(pixels, names_filter=lens_names(clip.vision))
        by_layer = lens(clip.vision, cache, directions, normalize=True)
    torch.testing.assert_close(
        by_layer[-1], torch.nn.functional.normalize(image, dim=-1) @ directions, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ms.InputError, match="no tokenizer"):
        from mechscope.vision import text_directions

        text_directions(clip.text, ["cat"])

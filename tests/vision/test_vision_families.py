"""Each vision family (and the CLIP/SigLIP text towers), built as a tiny random `transformers`
model, gives the same outputs in mechscope through both attention paths."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    SiglipTextConfig,
    SiglipTextModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import mechscope as ms
from mechscope.vision.embeddings import pooled_image, pooled_text
from tests.conftest import randomize_

VOCAB = 53
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
IMAGE = dict(image_size=16, patch_size=4)
TEXT = dict(vocab_size=VOCAB, max_position_embeddings=12, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 2)

CASES = {
    "vit-classifier": lambda: ViTForImageClassification(ViTConfig(**TOWER, **IMAGE, num_labels=5)),
    "vit-no-qkv-bias": lambda: ViTForImageClassification(ViTConfig(**TOWER, **IMAGE, num_labels=3, qkv_bias=False)),
    "vit-bare": lambda: ViTModel(ViTConfig(**TOWER, **IMAGE, hidden_act="gelu_new")),
    "clip-vision-projection": lambda: CLIPVisionModelWithProjection(
        CLIPVisionConfig(**TOWER, **IMAGE, projection_dim=24)
    ),
    "clip-vision-bare": lambda: CLIPVisionModel(CLIPVisionConfig(**TOWER, **IMAGE)),
    "clip-full": lambda: CLIPModel(
        CLIPConfig(text_config={**TOWER, **TEXT}, vision_config={**TOWER, **IMAGE}, projection_dim=20)
    ),
    "siglip-vision": lambda: SiglipVisionModel(SiglipVisionConfig(**TOWER, **IMAGE)),
    "clip-text": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TOWER, **TEXT, projection_dim=24)),
    "siglip-text": lambda: SiglipTextModel(SiglipTextConfig(**TOWER, **TEXT, projection_size=28)),
}


def _save(name, path):
    torch.manual_seed(0)
    hf_model = CASES[name]()
    hf_model.config._attn_implementation = "eager"
    randomize_(hf_model, seed=len(name))
    hf_model.save_pretrained(path)
    return hf_model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, _save(request.param, path), ms.load(path, device="cpu")


def _pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _tokens(seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB - 2, (2, 9), generator=torch.Generator().manual_seed(seed))
    tokens[0, 6], tokens[1, 8] = VOCAB - 1, VOCAB - 1  # end-of-text, where CLIP reads the embedding
    return tokens


def _reference(name, hf_model, inputs):
    """``(final residual stream, pooled output)`` from transformers; the stream is after the
    final norm except for CLIP's vision tower, whose ``last_hidden_state`` comes before it."""
    with torch.no_grad():
        if name in ("vit-classifier", "vit-no-qkv-bias"):
            return hf_model.vit(pixel_values=inputs).last_hidden_state, hf_model(pixel_values=inputs).logits
        if name == "clip-full":
            hidden = hf_model.vision_model(pixel_values=inputs).last_hidden_state
            return hidden, hf_model.get_image_features(pixel_values=inputs).pooler_output
        out = hf_model(**{"input_ids" if "text" in name else "pixel_values": inputs})
    if name == "vit-bare":  # its pooler (dense + tanh, used by no classifier) is not part of the hooked model
        return out.last_hidden_state, out.last_hidden_state[:, 0]
    pooled = {"clip-vision-projection": "image_embeds", "clip-text": "text_embeds"}.get(name, "pooler_output")
    return out.last_hidden_state, getattr(out, pooled)


@pytest.mark.parametrize("path", ["auto", "eager", "pattern-hook"])
def test_outputs_match_transformers(pair, path):
    """The final residual stream and the pooled output (class logits, image or text embedding)."""
    name, hf_model, model = pair
    text = "text" in name
    inputs = _tokens() if text else _pixels()
    model.cfg.attn_implementation = "eager" if path == "eager" else "auto"
    names = ("hook_pattern", "hook_resid_post", "ln_final.hook_out")
    try:
        with torch.no_grad():
            if path == "pattern-hook":
                logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith(names))
                pattern = cache["blocks.1.attn.hook_pattern"]
                torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
                causal = model.cfg.causal
                assert bool((pattern.triu(1) == 0).all()) == causal, "the mask is not the model's"
            else:
                logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith(names[1:]))
            pooled = pooled_text(model, inputs, logits) if text else pooled_image(model, logits)
    finally:
        model.cfg.attn_implementation = "auto"
    hidden, expected_pooled = _reference(name, hf_model, inputs)
    final = "ln_final.hook_out" if not name.startswith("clip-vision") and name != "clip-full" else None
    ours = cache[final or f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert expected_pooled.abs().max() > 0.3, "the reference output is too small to test anything"
    torch.testing.assert_close(ours, hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-4, rtol=1e-4)


def test_hidden_states_per_layer(pair):
    """Every layer's residual stream equals transformers' hidden states."""
    name, hf_model, model = pair
    text = "text" in name
    inputs = _tokens(1) if text else _pixels(1)
    tower = hf_model.vision_model if name == "clip-full" else hf_model
    key = "input_ids" if text else "pixel_values"
    with torch.no_grad():
        states = tower(**{key: inputs}, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.endswith("hook_resid_pre"))
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache["resid_pre", layer], states[layer], atol=1e-4, rtol=1e-4)


def test_every_hook_name_follows_the_grammar(pair):
    """Every hook point parses as a hook name, so caches, summaries and name filters handle them."""
    from mechscope.names import parse_act_name

    _, _, model = pair
    assert {parse_act_name(name).kind for name in model.hook_dict} >= {"embed", "resid_pre", "pattern"}


def test_vision_configs_are_data():
    """The architecture of each family is in its config: bidirectional, patches, class token."""
    vit = ms.load.__globals__["adapter_for"]("vit").config_from_hf(ViTConfig(**TOWER, **IMAGE))
    assert (vit.causal, vit.n_ctx, vit.class_token, vit.n_patches) == (False, 17, True, 16)
    with pytest.raises(ms.ConfigError, match="divide image_size"):
        ms.ModelConfig(
            d_model=8,
            n_layers=1,
            n_heads=2,
            d_mlp=8,
            d_vocab=8,
            n_ctx=10,
            image_size=10,
            patch_size=4,
            positional_embedding_type="none",
        )
    with pytest.raises(ms.ConfigError, match="sliding window needs causal"):
        ms.ModelConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, d_vocab=8, n_ctx=10, causal=False, sliding_window=3)


@pytest.mark.parametrize("name", ["vit-classifier", "clip-text"])
def test_weight_processing_is_refused_for_vision_and_embedding_towers(tmp_path, name):
    """Processing keeps log-probabilities, not the direction of an image or text embedding."""
    _save(name, tmp_path)
    with pytest.raises(ms.LoadError, match="processed=False"):
        ms.load(tmp_path, device="cpu", processed=True)


def test_wrong_inputs_are_named(pair):
    """A vision tower names the pixel shape it takes; a text tower refuses pixels as token ids."""
    name, _, model = pair
    match = "token ids must be an integer tensor" if "text" in name else r"pixels \[batch, 3, 16, 16\].*vision.pixels"
    with pytest.raises(ms.InputError, match=match):
        model(torch.zeros(1, 3, 8, 8))

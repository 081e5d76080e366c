"""Directions to read a vision model's residual stream against.

A ViT classifier's class directions are the columns of its unembedding (the classifier). A
CLIP-style model's are text embeddings: each label written into a template (``"a photo of a
{label}"``) and run through the text tower, then L2-normalised; an image's zero-shot score for a
label is the cosine between its image embedding and that direction. `load_clip` loads both
towers of a CLIP or SigLIP checkpoint directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError, LoadError
from mechscope.vision.embeddings import pooled_text

DEFAULT_TEMPLATE = "a photo of a {label}"
"""The prompt each label is written into for zero-shot directions (CLIP's usual template)."""


@dataclass
class ClipModels:
    """Both towers of a CLIP or SigLIP checkpoint and its contrastive temperature.

    ``logit_scale`` is the learned log temperature (image-text logits are ``exp(logit_scale)``
    times the cosine, plus ``logit_bias`` for SigLIP).

    Example:
        >>> import tempfile
        >>> from mechscope.vision import tiny_clip
        >>> clip = load_clip(tiny_clip(tempfile.mkdtemp(), ["a", "red", "circle"], d_model=16, n_layers=1))
        >>> clip.vision.cfg.image_size, clip.text.cfg.causal, clip.logit_bias  # a random CLIP written to disk
        (32, True, 0.0)
    """

    vision: object
    text: object
    logit_scale: float
    logit_bias: float = 0.0


def load_clip(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> ClipModels:
    """The vision and text towers of a full CLIP (``model_type`` ``"clip"``) or SigLIP
    (``"siglip"``) directory, each a `HookedTransformer` equal to ``transformers``' tower.

    Example:
        >>> clip = load_clip("tiny-clip")  # doctest: +SKIP
        >>> clip.vision.cfg.family, clip.text.cfg.family  # doctest: +SKIP
        ('clip_vision', 'clip_text')
    """
    from transformers import AutoConfig, AutoTokenizer

    from mechscope.loading.families import clip_text
    from mechscope.loading.pretrained import build_model, load, read_hf_weights

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise LoadError(f"{path} is not a checkpoint directory (no config.json)")
    hf = AutoConfig.from_pretrained(path)
    if hf.model_type not in ("clip", "siglip"):
        raise LoadError(
            f"{path} holds a {hf.model_type!r} model; load_clip reads full 'clip' or 'siglip' checkpoints "
            "(load a single tower with mechscope.load)"
        )
    device = torch.device(device) if device is not None else None
    vision = load(path, device=device)
    weights = read_hf_weights(path)
    cfg = clip_text.text_config(hf, projection="text_projection.weight" in weights)
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model"))
    tokenizer = AutoTokenizer.from_pretrained(path) if has_tokenizer else None  # text_directions needs one
    cfg.model_name = f"{path.name} (text tower)"
    cfg.default_prepend_bos = False  # the tokenizer adds its own start token
    text = build_model(cfg, clip_text.convert_weights(weights, cfg), tokenizer, device=vision.device)
    bias = float(weights["logit_bias"].reshape(())) if "logit_bias" in weights else 0.0
    return ClipModels(vision, text, float(weights["logit_scale"].reshape(())), bias)


def text_tokens(text_model, texts: list[str]) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None]:
    """``(tokens, attention_mask)`` for a text tower, as its own tokenizer makes them: CLIP's with
    start and end-of-text tokens, padded to the longest text (the mask marks the padding);
    SigLIP's padded to ``n_ctx`` as it was trained (no mask). Feed them to the tower, its cache or
    the patching tools; `pooled_text` reads the embedding from the logits.

    Example:
        >>> tokens, mask = text_tokens(clip.text, ["a photo of a cat"])  # doctest: +SKIP
        >>> logits, cache = clip.text.run_with_cache(tokens, attention_mask=mask)  # doctest: +SKIP
    """
    tokenizer = text_model.tokenizer
    if tokenizer is None:
        raise InputError("the text tower has no tokenizer; load it with load_clip from a checkpoint directory")
    if isinstance(texts, str) or not texts:
        raise InputError("texts must be a non-empty list of strings")
    padding = "max_length" if text_model.cfg.extra.get("pool") == "last" else True  # SigLIP: as trained
    batch = tokenizer(texts, padding=padding, max_length=text_model.cfg.n_ctx, truncation=True, return_tensors="pt")
    tokens = batch["input_ids"].to(text_model.device)
    mask = None if padding == "max_length" else batch["attention_mask"].to(text_model.device)
    return tokens, mask


@torch.no_grad()
def text_directions(
    text_model, labels: list[str], template: str = DEFAULT_TEMPLATE
) -> Float[Tensor, "d_vocab n_labels"]:
    """Unit text embeddings of ``template.format(label=...)`` for each label, as columns.

    Example:
        >>> directions = text_directions(clip.text, ["red circle", "blue square"])  # doctest: +SKIP
        >>> directions.shape, directions.norm(dim=0)  # doctest: +SKIP
        (torch.Size([32, 2]), tensor([1., 1.]))
    """
    if "{label}" not in template:
        raise InputError(f"the template must contain '{{label}}', got {template!r}")
    if not labels:
        raise InputError("no labels given")
    tokens, mask = text_tokens(text_model, [template.format(label=label) for label in labels])
    logits = text_model(tokens, attention_mask=mask)
    embeds = pooled_text(text_model, tokens, logits)  # [n_labels, d_vocab]
    return torch.nn.functional.normalize(embeds, dim=-1).T


def class_directions(model, labels: list[str] | None = None) -> tuple[Float[Tensor, "d_vocab n_labels"], list[str]]:
    """A classifier's class directions in its logit space (one-hot columns) and their names:
    every class of ``cfg.extra["labels"]``, or those named in ``labels``.

    Example:
        >>> from mechscope.vision import random_vit
        >>> directions, names = class_directions(random_vit(), ["square"])
        >>> directions.T.tolist(), names
        ([[0.0, 1.0, 0.0]], ['square'])
    """
    names = list(model.cfg.extra.get("labels") or [])
    if not names:
        raise InputError(f"{model.cfg.model_name} has no class labels (it is not an image classifier)")
    chosen = names if labels is None else labels
    missing = [label for label in chosen if label not in names]
    if missing:
        from mechscope.names import closest_names

        raise InputError(f"unknown classes {missing}; closest: {closest_names(missing[0], names)}")
    index = torch.tensor([names.index(label) for label in chosen], device=model.device)
    eye = torch.eye(model.cfg.d_vocab_out, device=model.device)
    return eye[:, index], chosen

"""A vision or text tower's pooled output, read from its per-position logits.

Vision and text towers are unembedded at every position (`mechscope.loading.families`), so a
lens or an attribution can read any position. The model's own output is one position's logits
(the class token; CLIP's end-of-text token; SigLIP's last text token) or, for SigLIP's vision
tower, the attention-pooling head over every position.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError


def pooled_image(model, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch d_vocab"]:
    """The output of a vision tower from its per-position ``logits``: class logits (ViT), the
    image embedding before L2 normalisation (CLIP, SigLIP).

    Example:
        >>> from mechscope.vision import random_vit
        >>> vit = random_vit()
        >>> pooled_image(vit, vit(torch.zeros(2, 3, 16, 16))).shape  # the class token's logits
        torch.Size([2, 3])
    """
    cfg = model.cfg
    if cfg.image_size is None:
        raise InputError(f"{cfg.model_name} is a text model; use pooled_text(model, tokens, logits)")
    if cfg.attention_pool:
        return model.pool_head(logits)
    if cfg.class_token:
        return logits[:, 0]
    raise InputError(f"{cfg.model_name} has neither a class token nor a pooling head to read an output from")


def text_positions(model, tokens: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """The position each row's text embedding is read at: CLIP's first end-of-text token (the
    highest token id when the config's ``eos_token_id`` is the legacy 2, as ``transformers``
    does), SigLIP's last position.

    Example:
        >>> text_positions(clip_text, torch.tensor([[5, 7, 9, 2, 2]])).tolist()  # doctest: +SKIP
        [3]
    """
    pool, eos = model.cfg.extra.get("pool"), model.cfg.extra.get("eos_token_id")
    if pool == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device)
    if pool != "eos":
        raise InputError(f"{model.cfg.model_name} is not a CLIP or SigLIP text tower (cfg.extra['pool'] is unset)")
    if eos == 2:
        return tokens.argmax(-1)
    found = tokens == eos
    if not bool(found.any(-1).all()):
        raise InputError(f"every row needs the end-of-text token {eos}; tokenise with the model's tokenizer")
    return found.int().argmax(-1)


def pooled_text(
    model, tokens: Int[Tensor, "batch pos"], logits: Float[Tensor, "batch pos d_vocab"]
) -> Float[Tensor, "batch d_vocab"]:
    """The text embedding (before L2 normalisation) of each row, from per-position ``logits``.

    Example:
        >>> import tempfile
        >>> from mechscope.vision import load_clip, text_tokens, tiny_clip
        >>> clip = load_clip(tiny_clip(tempfile.mkdtemp(), ["a", "red", "circle"], d_model=16, n_layers=1))
        >>> tokens, mask = text_tokens(clip.text, ["a red circle", "a circle"])
        >>> pooled_text(clip.text, tokens, clip.text(tokens, attention_mask=mask)).shape  # [text, d_embed]
        torch.Size([2, 32])
    """
    rows = torch.arange(tokens.shape[0], device=logits.device)
    return logits[rows, text_positions(model, tokens).to(logits.device)]

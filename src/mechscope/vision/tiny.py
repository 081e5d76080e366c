"""Tiny randomly initialised CLIP checkpoints, written offline, for tests, demos and the tour.

`tiny_clip` saves a ``transformers`` ``CLIPModel`` with random weights, a word-level tokenizer
over the words it will be asked about and a ``CLIPImageProcessor``: a directory every
`mechscope.vision` tool reads exactly as it reads a real CLIP checkpoint. Its weights mean
nothing; what it shows is the shape of each analysis, not a finding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<unk>")


def words_of(texts: list[str]) -> list[str]:
    """The distinct lower-case words of ``texts``, in order of first appearance.

    Example:
        >>> words_of(["a photo of a red circle", "a blue square"])
        ['a', 'photo', 'of', 'red', 'circle', 'blue', 'square']
    """
    return list(dict.fromkeys(w for text in texts for w in re.findall(r"[a-z0-9]+", text.lower())))


def word_tokenizer(words: list[str], path: Path, max_length: int):
    """A fast word-level tokenizer (CLIP's conventions: start token, end token, pad = end token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate([SPECIAL[2], *words, SPECIAL[0], SPECIAL[1]])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[2]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = SPECIAL[0], SPECIAL[1]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,
        unk_token=SPECIAL[2],
        model_max_length=max_length,
        do_lower_case=True,
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def tiny_clip(
    path: str | Path,
    words: list[str],
    *,
    seed: int = 0,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    image_size: int = 32,
    patch_size: int = 4,
    projection_dim: int = 32,
) -> Path:
    """Write a random CLIP checkpoint to ``path`` (tokenizer over ``words``); returns ``path``.

    Example:
        >>> import tempfile
        >>> folder = tiny_clip(tempfile.mkdtemp(), ["a", "photo", "of", "circle"], d_model=16, n_layers=1)
        >>> all((folder / f).is_file() for f in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"))
        True
    """
    from transformers import CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    max_length = 16
    tokenizer = word_tokenizer(words, path, max_length)
    tower = dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads)
    tower["intermediate_size"] = 4 * d_model
    config = CLIPConfig(
        text_config=dict(
            **tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(**tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the PIL image processor without torchvision is expected
    hf_logging.disable_progress_bar()
    try:
        # Looked up here: without torchvision, transformers warns on this name's first look-up.
        from transformers import CLIPImageProcessor

        model.save_pretrained(path)
        size = {"shortest_edge": image_size}
        CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
    (path / "mechscope_tiny.json").write_text(json.dumps({"random": True, "seed": seed, "words": words}))
    return path


def random_vit(
    labels: tuple[str, ...] = ("circle", "square", "triangle"),
    *,
    seed: int = 0,
    d_model: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    image_size: int = 16,
    patch_size: int = 4,
):
    """A randomly initialised ViT-style classifier built from a `ModelConfig` alone (no checkpoint,
    no image processor: feed it pixels ``[batch, 3, image_size, image_size]``).

    Example:
        >>> vit = random_vit()
        >>> vit(torch.zeros(2, 3, 16, 16)).shape  # [batch, class token + 16 patches, classes]
        torch.Size([2, 17, 3])
    """
    from mechscope.model.config import ModelConfig
    from mechscope.model.transformer import HookedTransformer

    n_patches = (image_size // patch_size) ** 2
    cfg = ModelConfig(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        d_mlp=4 * d_model,
        d_vocab=len(labels),
        n_ctx=n_patches + 1,
        act_fn="gelu",
        positional_embedding_type="none",
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=True,
        causal=False,
        image_size=image_size,
        patch_size=patch_size,
        class_token=True,
        patch_bias=True,
        model_name="random-vit",
        family="vit",
        extra={"labels": list(labels)},
    )
    return HookedTransformer(cfg).init_weights(seed=seed, std=0.2).eval()

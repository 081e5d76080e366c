"""Vision transformers in mechscope: image inputs, the patch grid, synthetic images, zero-shot
directions and the analyses of `mechscope.vision.analysis` (attention over patches, lens, direct
attribution, activation patching between images) and `mechscope.vision.sae`.

Vision models are ordinary `HookedTransformer` families (``vit``, ``clip_vision_model``,
``siglip_vision_model``; full ``clip``/``siglip`` directories load as their vision tower, and
`load_clip` loads both towers), with the hook names of language models; ``pos`` is the class
token (position 0 where the model has one) or an image patch (`PatchGrid`).
"""

from mechscope.vision.analysis import (
    attention_grid,
    attribution_names,
    direct_attribution,
    lens,
    lens_names,
    patch_images,
    scores,
)
from mechscope.vision.embeddings import pooled_image, pooled_text, text_positions
from mechscope.vision.images import display_image, image_files, image_processor, model_view, pixels
from mechscope.vision.patches import PatchGrid, to_patches, upsample
from mechscope.vision.sae import PatchActivation, harvest, top_patches, train_vision_sae
from mechscope.vision.synthetic import ShapeImages, shapes
from mechscope.vision.tiny import random_vit, tiny_clip, words_of
from mechscope.vision.zero_shot import (
    DEFAULT_TEMPLATE,
    ClipModels,
    class_directions,
    load_clip,
    text_directions,
    text_tokens,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "ClipModels",
    "PatchActivation",
    "PatchGrid",
    "ShapeImages",
    "attention_grid",
    "attribution_names",
    "class_directions",
    "direct_attribution",
    "display_image",
    "harvest",
    "image_files",
    "image_processor",
    "lens",
    "lens_names",
    "load_clip",
    "model_view",
    "patch_images",
    "pixels",
    "pooled_image",
    "pooled_text",
    "random_vit",
    "scores",
    "shapes",
    "text_directions",
    "text_positions",
    "text_tokens",
    "tiny_clip",
    "to_patches",
    "top_patches",
    "train_vision_sae",
    "upsample",
    "words_of",
]

"""Images in: PIL images, arrays, tensors or files, through the model's own image processor.

`pixels` turns any of them into the ``[batch, channel, height, width]`` tensor a vision model
takes, with the ``transformers`` image processor saved beside the checkpoint (resizing,
cropping, normalisation exactly as the model was trained with). `image_files` lists a folder of
images, so every tool runs on real photographs as readily as on the synthetic shapes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError, LoadError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ImageInput = Any  # a PIL image, a path, an [H, W, C] array or a [C, H, W] tensor, or a list of them


def image_files(folder: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The image files of ``folder`` (sorted by name; ``limit`` keeps the first ones).

    Example:
        >>> image_files("my-photos")  # doctest: +SKIP
        [PosixPath('my-photos/cat.jpg'), PosixPath('my-photos/dog.png')]
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images with a suffix among {IMAGE_SUFFIXES}")
    return files[:limit]


def open_image(image: ImageInput):
    """A PIL RGB image from a path, a PIL image, an ``[H, W, C]`` array (``uint8``, or floats in
    ``[0, 1]``) or a ``[C, H, W]`` tensor of the same ranges."""
    from PIL import Image

    if isinstance(image, str | os.PathLike):
        path = Path(image).expanduser()
        if not path.is_file():
            raise InputError(f"no such image file: {str(path)!r}")
        with Image.open(path) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise InputError(
                f"an image tensor is [channel, height, width] with 1 or 3 channels, got {tuple(image.shape)}"
            )
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3):
            raise InputError(f"an image array is [height, width, channel] with 1 or 3 channels, got {image.shape}")
        if image.dtype != np.uint8:
            if image.min() < 0 or image.max() > 1:
                raise InputError("float image arrays hold values in [0, 1]; pass uint8 for 0..255")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(image.repeat(3, axis=-1) if image.shape[-1] == 1 else image)
    raise InputError(
        f"cannot read an image from {type(image).__name__}; pass a PIL image, a file path, an [H, W, C] "
        "array or a [C, H, W] tensor"
    )


def as_image_list(images: ImageInput | Sequence[ImageInput]) -> list:
    """``images`` as a list of PIL images; a folder path expands to its image files."""
    if isinstance(images, str | os.PathLike) and Path(images).expanduser().is_dir():
        images = image_files(images)
    elif isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    elif not isinstance(images, list | tuple):
        images = [images]
    if not images:
        raise InputError("no images given")
    return [open_image(image) for image in images]


def image_processor(model) -> Any:
    """The ``transformers`` image processor saved with ``model`` (loaded once, then kept on it).

    A model built in memory has none; set one by hand.

    Example:
        >>> from transformers import CLIPImageProcessor
        >>> from mechscope.vision import random_vit
        >>> vit = random_vit()
        >>> vit.image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        >>> image_processor(vit) is vit.image_processor
        True
    """
    processor = getattr(model, "image_processor", None)
    if processor is not None:
        return processor
    folder = model.cfg.extra.get("hf_dir")
    if model.cfg.image_size is None:
        raise InputError(f"{model.cfg.model_name} is not a vision model (it takes tokens, not images)")
    if folder is None or not (Path(folder) / "preprocessor_config.json").is_file():
        raise LoadError(
            f"{model.cfg.model_name} has no preprocessor_config.json beside its weights; set "
            "model.image_processor to a transformers image processor (e.g. CLIPImageProcessor())"
        )
    from transformers import AutoImageProcessor
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the PIL fallback without torchvision is expected, not news
    try:
        processor = AutoImageProcessor.from_pretrained(folder)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.image_processor = processor
    return processor


def pixels(model, images: ImageInput | Sequence[ImageInput]) -> Float[Tensor, "batch channel height width"]:
    """The model's pixel input for ``images`` (one, a list, or a folder path), on its device.

    Example:
        >>> x = pixels(model, shapes(2, seed=0).images)  # doctest: +SKIP
        >>> x.shape  # doctest: +SKIP
        torch.Size([2, 3, 32, 32])
    """
    batch = image_processor(model)(images=as_image_list(images), return_tensors="pt")["pixel_values"]
    size = model.cfg.image_size
    if tuple(batch.shape[-2:]) != (size, size):
        raise InputError(
            f"the image processor made {tuple(batch.shape[-2:])} pixels but the model takes {size}x{size}; "
            "fix the processor's size/crop_size"
        )
    return batch.to(device=model.device, dtype=next(model.parameters()).dtype)


def display_image(image: ImageInput, size: int, crop: bool = True) -> Float[Tensor, "height width channel"]:
    """``image`` framed as a model sees it, ``[size, size, 3]`` in ``[0, 1]``, to draw overlays on:
    shorter side resized to ``size`` and centre-cropped (``crop``, as CLIP's processor does), or
    the whole image resized to the square (as ViT's and SigLIP's do).

    Example:
        >>> display_image(torch.rand(3, 20, 40), 16).shape
        torch.Size([16, 16, 3])
    """
    from PIL import Image

    image = open_image(image)
    if not crop:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    array = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(array)


def model_view(model, image: ImageInput) -> Float[Tensor, "height width channel"]:
    """`display_image` framed as the model's own image processor frames it (cropped or not).

    Example:
        >>> from transformers import CLIPImageProcessor
        >>> from mechscope.vision import random_vit, shapes
        >>> vit = random_vit()  # 16 x 16 images
        >>> vit.image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        >>> model_view(vit, shapes(1, size=32, seed=0).images[0]).shape  # [height, width, channel] in [0, 1]
        torch.Size([16, 16, 3])
    """
    crop = bool(getattr(image_processor(model), "do_center_crop", False))
    return display_image(image, model.cfg.image_size, crop=crop)

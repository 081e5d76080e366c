"""Sparse autoencoders on a vision model's activations, read as image patches.

`harvest` collects one hook's activations at every patch of every image; `train_vision_sae`
trains an SAE on them with mechscope's trainer (`mechscope.sae.train_sae`); `top_patches` finds
the patches where a latent fires most, with their images and pixel boxes, for
`mechscope.viz.vision.patch_gallery`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.vision.patches import PatchGrid


@dataclass(frozen=True)
class PatchActivation:
    """One patch where a latent fired: image index, position, pixel box and activation.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> from mechscope.vision import PatchGrid, random_vit
        >>> vit = random_vit()  # 16 x 16 images in 4 x 4 patches after a class token
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=8, hook_name="blocks.1.hook_resid_post"))
        >>> hit = top_patches(vit, sae, torch.rand(2, 3, 16, 16), latent=0, k=1)[0]
        >>> hit.image in (0, 1), 1 <= hit.pos <= 16, hit.box == PatchGrid.of(vit).box(hit.pos)
        (True, True, True)
    """

    image: int
    pos: int
    box: tuple[int, int, int, int]
    value: float


@torch.no_grad()
def harvest(
    model, hook_name: str, pixels: Float[Tensor, "batch channel height width"], batch_size: int = 32
) -> Float[Tensor, "batch n_patches d"]:
    """The activation of ``hook_name`` (a ``[batch, pos, d]`` hook) at every patch of every image
    (class tokens dropped).

    Example:
        >>> from mechscope.vision.tiny import random_vit
        >>> harvest(random_vit(), "blocks.1.hook_resid_post", torch.zeros(5, 3, 16, 16)).shape
        torch.Size([5, 16, 32])
    """
    if hook_name not in model.hook_dict:
        from mechscope.names import unknown_name_error

        raise unknown_name_error(hook_name, model.hook_dict)
    prefix = model.cfg.n_prefix_tokens
    chunks = []
    for start in range(0, pixels.shape[0], batch_size):
        _, cache = model.run_with_cache(pixels[start : start + batch_size], names_filter=[hook_name])
        acts = cache[hook_name]
        if acts.dim() != 3:
            raise InputError(f"{hook_name} is {tuple(acts.shape)}; harvest reads [batch, pos, d] hooks")
        chunks.append(acts[:, prefix:])
    return torch.cat(chunks)


def train_vision_sae(
    model,
    hook_name: str,
    pixels: Float[Tensor, "batch channel height width"],
    sae: dict | None = None,
    train: dict | None = None,
    batch_size: int = 256,
    seed: int = 0,
):
    """An SAE trained on ``hook_name`` at every patch of ``pixels``. ``sae`` and ``train`` are
    `mechscope.sae.SAEConfig` and `mechscope.sae.TrainConfig` fields (``d_in`` and ``hook_name``
    are filled in; ``d_sae`` defaults to four times ``d_in``).

    Example:
        >>> from mechscope.vision.tiny import random_vit
        >>> vit, pixels = random_vit(), torch.rand(8, 3, 16, 16)
        >>> sae = train_vision_sae(vit, "blocks.1.hook_resid_post", pixels, {"architecture": "topk", "k": 4},
        ...                        {"steps": 5}, batch_size=32)
        >>> sae.cfg.d_in, sae.cfg.d_sae
        (32, 128)
    """
    from mechscope.sae import TensorSource, train_sae

    acts = harvest(model, hook_name, pixels).flatten(0, 1)  # [n_images * n_patches, d]
    d_in = acts.shape[-1]
    sae_cfg = {"d_in": d_in, "d_sae": 4 * d_in, "hook_name": hook_name, **(sae or {})}
    train_cfg = {"progress": False, **(train or {})}
    source = TensorSource({hook_name: acts}, batch_size=min(batch_size, acts.shape[0]), seed=seed)
    return train_sae(sae_cfg, source, train_cfg, seed=seed)


@torch.no_grad()
def top_patches(
    model, sae, pixels: Float[Tensor, "batch channel height width"], latent: int, k: int = 8
) -> list[PatchActivation]:
    """The ``k`` patches (over all images) where ``latent`` of ``sae`` fires most, strongest first.

    Example:
        >>> from mechscope.vision.tiny import random_vit
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=8, hook_name="blocks.1.hook_resid_post"))
        >>> best = top_patches(random_vit(), sae, torch.rand(4, 3, 16, 16), latent=3, k=2)
        >>> len(best), best[0].value >= best[1].value
        (2, True)
    """
    d_sae = sae.cfg.d_sae
    if not 0 <= latent < d_sae:
        raise InputError(f"latent {latent} is out of range for an SAE with {d_sae} latents")
    acts = sae.encode(harvest(model, sae.cfg.hook_name, pixels))[..., latent]  # [n_images, n_patches]
    values, flat = acts.flatten().topk(min(k, acts.numel()))
    grid = PatchGrid.of(model)
    out = []
    for value, index in zip(values.tolist(), flat.tolist(), strict=True):
        image, patch = divmod(index, grid.n_patches)
        pos = grid.n_prefix + patch
        out.append(PatchActivation(image, pos, grid.box(pos), value))
    return out

"""Reading a vision model: attention over patches, a lens and direct attribution to class or
text directions, and activation patching between two images.

Scores are always ``f(pooled) @ directions``: ``pooled`` is the model's output read from its
per-position logits (`pooled_image`), ``directions`` are columns from `class_directions` (a ViT
classifier's classes) or `text_directions` (CLIP zero-shot), and ``f`` is the identity, or the L2
normalisation with ``normalize=True`` (CLIP's cosine). The lens applies the final norm and the
unembedding to the residual stream entering each layer; the attribution splits the final
residual stream at the pooled position into the outputs that wrote it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.names import act_name
from mechscope.patching.activation import get_site
from mechscope.patching.engine import patch_grid, run_patches
from mechscope.vision.embeddings import pooled_image
from mechscope.vision.patches import PatchGrid


def scores(
    model, logits: Float[Tensor, "batch pos d_vocab"], directions: Float[Tensor, "d_vocab n_labels"], normalize: bool
) -> Float[Tensor, "batch n_labels"]:
    """``f(pooled_image(model, logits)) @ directions`` (``f``: L2 normalisation or identity).

    Example:
        >>> from mechscope.vision import class_directions, random_vit
        >>> vit = random_vit()
        >>> directions, names = class_directions(vit)
        >>> scores(vit, vit(torch.zeros(2, 3, 16, 16)), directions, normalize=False).shape
        torch.Size([2, 3])
    """
    pooled = pooled_image(model, logits)
    return (F.normalize(pooled, dim=-1) if normalize else pooled) @ directions.to(pooled)


def lens_names(model) -> list[str]:
    """The hooks `lens` reads: the residual stream entering every layer and leaving the last.

    Example:
        >>> from mechscope.vision import random_vit
        >>> lens_names(random_vit())  # two layers
        ['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_pre', 'blocks.1.hook_resid_post']
    """
    n = model.cfg.n_layers
    return [act_name("resid_pre", layer) for layer in range(n)] + [act_name("resid_post", n - 1)]


@torch.no_grad()
def lens(
    model, cache, directions: Float[Tensor, "d_vocab n_labels"], normalize: bool = False
) -> Float[Tensor, "layer_plus_one batch n_labels"]:
    """Scores read from the residual stream entering each layer (the last row: leaving the final
    layer, the model's own scores): the logit lens, with the final norm recomputed per layer.

    ``cache`` holds `lens_names`. For CLIP pass unit text directions and ``normalize=True``
    (zero-shot cosines); for a ViT classifier, class directions and ``normalize=False``.

    Example:
        >>> from mechscope.vision import class_directions, random_vit
        >>> vit = random_vit()
        >>> _, cache = vit.run_with_cache(torch.zeros(2, 3, 16, 16), names_filter=lens_names(vit))
        >>> lens(vit, cache, class_directions(vit)[0]).shape  # [n_layers + 1, batch, n_classes]
        torch.Size([3, 2, 3])
    """
    rows = []
    for name in lens_names(model):
        resid = cache[name]
        logits = model.unembed(resid if model.ln_final is None else model.ln_final(resid))
        rows.append(scores(model, logits, directions, normalize))
    return torch.stack(rows)


@torch.no_grad()
def direct_attribution(
    model,
    cache,
    directions: Float[Tensor, "d_vocab n_labels"],
    normalize: bool = False,
    by: Literal["layer", "head"] = "layer",
) -> tuple[Float[Tensor, "component batch n_labels"], list[str]]:
    """Each component's direct contribution to the scores of a class-token model (ViT, CLIP):
    ``embed``, then ``{l}_attn_out`` and ``{l}_mlp_out`` (``by="head"``: each head ``L{l}H{h}``,
    then the rest of the stream as one component), then ``bias`` (the final norm's bias and the
    unembedding bias). With the cached final-norm scale frozen, the rows sum to the scores
    (with ``normalize``, each is divided by the pooled embedding's norm, so they sum to the cosine).

    ``cache`` holds the component outputs and ``ln_final.hook_scale`` (run the model with
    ``names_filter=attribution_names(model, by)``). SigLIP's attention-pooling head is not linear in
    its input, so its towers have no direct attribution.

    Example:
        >>> from mechscope.vision import class_directions, random_vit
        >>> vit = random_vit()
        >>> _, cache = vit.run_with_cache(torch.zeros(2, 3, 16, 16), names_filter=attribution_names(vit))
        >>> parts, labels = direct_attribution(vit, cache, class_directions(vit)[0])
        >>> parts.shape, labels[:3]  # [component, batch, n_classes]
        (torch.Size([6, 2, 3]), ['embed', '0_attn_out', '0_mlp_out'])
    """
    cfg = model.cfg
    if cfg.attention_pool or not cfg.class_token:
        raise InputError(
            f"{cfg.model_name} pools its output with an attention head, which is not linear in the residual "
            "stream: direct attribution needs a class-token model (ViT, CLIP); use lens instead"
        )
    if by not in ("layer", "head"):
        raise InputError(f"by must be 'layer' or 'head', got {by!r}")
    if by == "layer":
        stack, labels = cache.decompose_resid(apply_ln=True, pos_slice=0, return_labels=True)  # [component, batch, d]
    else:
        stack, labels = cache.stack_head_results(pos_slice=0, apply_ln=True, incl_remainder=True, return_labels=True)
    weight = getattr(model.ln_final, "w", None)
    weight = 1.0 if weight is None else weight
    parts = (stack * weight) @ model.W_U  # [component, batch, d_vocab]
    bias = model.b_U
    if model.ln_final is not None and getattr(model.ln_final, "b", None) is not None:
        bias = bias + model.ln_final.b @ model.W_U
    parts = torch.cat((parts, bias.expand_as(parts[:1]))) @ directions.to(parts)  # [component + 1, batch, n_labels]
    if normalize:
        final = cache[act_name("resid_post", cfg.n_layers - 1)][:, 0]
        pooled = model.unembed(model.ln_final(final))  # [batch, d_vocab]
        parts = parts / pooled.norm(dim=-1)[:, None]
    return parts, [*labels, "bias"]


def attribution_names(model, by: Literal["layer", "head"] = "layer") -> list[str]:
    """The hooks `direct_attribution` reads (``by="head"`` adds every layer's ``hook_z``).

    Example:
        >>> from mechscope.vision import random_vit
        >>> vit = random_vit()
        >>> attribution_names(vit)[:4]
        ['hook_embed', 'ln_final.hook_scale', 'blocks.1.hook_resid_post', 'blocks.0.hook_attn_out']
        >>> [name for name in attribution_names(vit, "head") if name.endswith("hook_z")]
        ['blocks.0.attn.hook_z', 'blocks.1.attn.hook_z']
    """
    n = model.cfg.n_layers
    names = ["hook_embed", "ln_final.hook_scale", act_name("resid_post", n - 1)]
    for layer in range(n):
        names += [act_name("attn_out", layer), act_name("mlp_out", layer)]
        names += [act_name("z", layer)] if by == "head" else []
    return names


def attention_grid(
    cache, layer: int, head: int, grid: PatchGrid, query: int = 0
) -> Float[Tensor, "batch n_rows n_cols"]:
    """How much position ``query`` (the class token by default) attends to each patch.

    Example:
        >>> from mechscope.vision import class_directions, random_vit
        >>> vit = random_vit()
        >>> _, cache = vit.run_with_cache(torch.zeros(2, 3, 16, 16), names_filter=lambda n: n.endswith("pattern"))
        >>> attention_grid(cache, 1, 0, PatchGrid.of(vit)).shape
        torch.Size([2, 4, 4])
    """
    pattern = cache[act_name("pattern", layer)]  # [batch, head, query_pos, key_pos]
    if not 0 <= head < pattern.shape[1]:
        raise InputError(f"head {head} is out of range for {pattern.shape[1]} heads")
    return grid.to_patches(pattern[:, head, query])


@torch.no_grad()
def patch_images(
    model,
    base_pixels: Float[Tensor, "batch channel height width"],
    source_pixels: Float[Tensor, "batch channel height width"],
    metric,
    site: str = "resid_pre",
    layers: list[int] | None = None,
    positions: list[int] | None = None,
    batch_size: int | None = None,
) -> Float[Tensor, "layer n_positions"]:
    """Activation patching between images: for each layer and position (each image patch, and the
    class token), the metric after copying ``site`` at that position from the ``source_pixels``
    run into the ``base_pixels`` run (averaged over the batch of image pairs).

    Runs on the batched engine (`mechscope.patching.engine.run_patches`): many patches per forward,
    each forward starting at its patched layer from the cached base residual stream. Attention is
    bidirectional, so every position is recomputed. ``metric(logits) -> [batch]`` reads per-position
    logits, e.g. ``lambda logits: scores(model, logits, directions, True)[:, label]``. `to_patches`
    turns the ``pos`` axis into the image grid. ``positions`` patches only those positions (an
    image region: `PatchGrid.positions_in` of a pixel box), one column each.

    Example:
        >>> from mechscope.vision import random_vit, to_patches
        >>> vit = random_vit()
        >>> base, source = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
        >>> effect = patch_images(vit, base, source, lambda logits: logits[:, 0, 1], layers=[0, 1])
        >>> effect.shape, to_patches(vit, effect).shape  # [layer, pos], then [layer, n_rows, n_cols]
        (torch.Size([2, 17]), torch.Size([2, 4, 4]))
    """
    if base_pixels.shape != source_pixels.shape:
        raise InputError(
            f"base and source images differ in shape: {tuple(base_pixels.shape)} vs {tuple(source_pixels.shape)}"
        )
    site, by = get_site(site, ("pos",))
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else [int(layer) for layer in layers]
    if not layers or any(not 0 <= layer < n for layer in layers):
        raise InputError(f"layers must be a non-empty subset of range({n}), got {layers}")
    names = [act_name("resid_pre", layer) for layer in range(n)]
    _, base_cache = model.run_with_cache(base_pixels, names_filter=names)
    _, source_cache = model.run_with_cache(source_pixels, names_filter=[site.hook(layer) for layer in layers])
    base_resid = {layer: base_cache[names[layer]] for layer in range(n)}
    sources = {layer: source_cache[site.hook(layer)] for layer in layers}
    if positions is None:
        positions = list(range(model.cfg.n_ctx))
    elif not positions or any(not 0 <= int(p) < model.cfg.n_ctx for p in positions):
        raise InputError(f"positions must be a non-empty list in range({model.cfg.n_ctx}), got {positions}")
    patches = patch_grid((len(positions),), layers)
    patches[:, 1] = torch.as_tensor(positions, dtype=torch.long)[patches[:, 1]]  # grid index -> position
    out = run_patches(model, base_resid, sources, site, by, patches, metric, batch_size=batch_size)
    return out.mean(-1).view(len(layers), len(positions))

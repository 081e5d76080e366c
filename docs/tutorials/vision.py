# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Vision transformers
#
# ViT, CLIP and SigLIP are ordinary mechscope models: one `HookedTransformer` with the language
# models' hook names, where a position is the class token or an image patch. This page uses a
# tiny CLIP with random weights, written to disk in the layout of a real checkpoint and read
# back exactly as one would be, and synthetic images of coloured shapes, so it runs offline in
# seconds. Its numbers mean nothing about vision; the calls are the ones a real checkpoint takes
# (`load_clip("clip-vit-base-patch32")`, `pixels(model, "my-photos/")`). It shows:
#
# 1. images through the checkpoint's image processor, and the patch grid;
# 2. `run_with_cache` over image patches, and attention as a picture;
# 3. the **lens** and **direct attribution** to zero-shot class directions;
# 4. **activation patching** between two images, by layer and patch;
# 5. per-patch values drawn over the images as an **overlay** figure.
#
# The same tour on the tiny CLIP, or on a real checkpoint directory, written as an HTML report:
#
# ```bash
# mechscope tour --vision                      # a random tiny CLIP
# mechscope tour --vision path/to/checkpoint   # a CLIP, SigLIP or ViT checkpoint directory
# ```

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display

from mechscope.vision import (
    PatchGrid,
    attention_grid,
    attribution_names,
    class_directions,
    direct_attribution,
    lens,
    lens_names,
    load_clip,
    model_view,
    patch_images,
    pixels,
    random_vit,
    scores,
    shapes,
    text_directions,
    tiny_clip,
    to_patches,
    words_of,
)
from mechscope.viz import Overlay, save_overlays_png

torch.set_grad_enabled(False)
out = Path(tempfile.mkdtemp())

# %% [markdown]
# ## A tiny CLIP and synthetic images
#
# `tiny_clip` writes a random CLIP (both towers, a tokenizer knowing the given words and an
# image processor) as a `transformers` checkpoint directory; `load_clip` reads the two towers.
# `shapes` draws labelled images of coloured shapes, and `pixels` passes them through the
# checkpoint's own image processor.

# %%
labels = ["red circle", "blue square", "green triangle", "yellow cross"]
words = words_of([f"a photo of a {label}" for label in labels])
clip = load_clip(tiny_clip(out / "tiny-clip", words, d_model=32, n_layers=2, image_size=16))
data = shapes(8, size=32, seed=0, colours=("red", "blue", "green", "yellow"))
x = pixels(clip.vision, data.images)
grid = PatchGrid.of(clip.vision)
print(x.shape, grid)
print(data.labels)

# %% [markdown]
# Position 0 is the class token; position `1 + row * n_cols + col` is the patch at that cell,
# row-major from the top left. `model_view` shows an image as the model frames it.

# %%
fig, axes = plt.subplots(1, 8, figsize=(12, 1.8))
for ax, image, label in zip(axes, data.images, data.labels, strict=True):
    ax.imshow(model_view(clip.vision, image))
    ax.set_title(label, fontsize=8)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Caching over patches
#
# The vision tower takes pixels where a language model takes tokens; every hook is the usual
# one. `attention_grid` reads one head's attention from a query (here the class token) to every
# patch, as the image grid.

# %%
names = lens_names(clip.vision) + attribution_names(clip.vision) + ["blocks.1.attn.hook_pattern"]
logits, cache = clip.vision.run_with_cache(x, names_filter=names)
print(logits.shape, cache["blocks.1.attn.hook_pattern"].shape)  # [image, pos, d_embed]; [image, head, query, key]
attention = attention_grid(cache, layer=1, head=0, grid=grid)  # [image, n_rows, n_cols]
print(attention[0])

# %% [markdown]
# ## The lens and direct attribution to class directions
#
# The zero-shot direction of a label is the unit text embedding of "a photo of a {label}" from
# the text tower. The lens applies the final norm and projection to the residual stream
# entering each layer and reads the cosine with each direction (its last row is the model's own
# zero-shot score). Direct attribution splits that final score into the embedding, each
# attention and MLP output and the biases; the parts add up to it exactly.

# %%
directions = text_directions(clip.text, labels)  # [d_embed, label], unit columns
by_layer = lens(clip.vision, cache, directions, normalize=True)  # [layer + 1, image, label]
parts, components = direct_attribution(clip.vision, cache, directions, normalize=True)  # [component, image, label]
final = scores(clip.vision, logits, directions, normalize=True)
print(by_layer.shape, components)
print("the parts add up to the score:", torch.allclose(parts.sum(0), final, atol=1e-5))

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].imshow(by_layer[:, 0].T, cmap="RdBu_r", vmin=-1, vmax=1)
axes[0].set(title=f"lens, image 0 ({data.labels[0]})", xlabel="layer", yticks=range(4), yticklabels=labels)
axes[1].bar(components, parts[:, 0, 0])
axes[1].set(title=f"direct attribution to '{labels[0]}', image 0")
axes[1].tick_params(axis="x", rotation=45)
plt.tight_layout()
plt.show()

# %% [markdown]
# A ViT classifier reads class directions from its own unembedding instead
# (`class_directions`), with `normalize=False`:

# %%
vit = random_vit(("circle", "square", "triangle"))
vit_directions, vit_labels = class_directions(vit)
vit_logits, vit_cache = vit.run_with_cache(x, names_filter=lens_names(vit))  # built in memory: 16 x 16 pixels
print(vit_labels, lens(vit, vit_cache, vit_directions).shape)

# %% [markdown]
# ## Patching between two images
#
# `patch_images` patches the residual stream at every (layer, position) from a source image
# into a base image and reads a metric on the patched output, here the difference of the
# zero-shot scores of the two images' labels. The patches run as batch rows of few forwards;
# `to_patches` lays the result out as the image grid.


# %%
def metric(batch_logits):
    s = scores(clip.vision, batch_logits, directions, normalize=True)
    return s[:, 1] - s[:, 0]


effect = patch_images(clip.vision, x[:1], x[1:2], metric, layers=[0, 1])  # [layer, pos]
effect_grid = to_patches(clip.vision, effect)  # [layer, n_rows, n_cols]
print(effect_grid.shape, "class token:", [round(value, 3) for value in effect[:, 0].tolist()])

# %% [markdown]
# ## Overlays
#
# `Overlay(image, grid, caption)` draws any per-patch values over an image;
# `save_overlays_png` and `save_overlays_html` write a set of them (the HTML page has a tooltip
# per patch). Here: the patching effect at layer 0 over the base image, and the norm of the
# residual stream after layer 1 at every patch of four images.

# %%
_, resid = clip.vision.run_with_cache(x, names_filter=["blocks.1.hook_resid_post"])
norms = to_patches(clip.vision, resid["resid_post", 1].norm(dim=-1))  # [image, n_rows, n_cols]
panels = [Overlay(model_view(clip.vision, data.images[0]), effect_grid[0], "patching effect, layer 0")]
panels += [Overlay(model_view(clip.vision, data.images[i]), norms[i], data.labels[i]) for i in range(4)]
display(Image(filename=save_overlays_png(panels, out / "overlays.png", "Per-patch values", columns=5)))

"""``mechscope tour --vision``: a vision transformer on synthetic shape images.

Without a checkpoint the tour writes a tiny randomly initialised CLIP (both towers, a word-level
tokenizer over the labels, an image processor) and reads it exactly as it would a real one: the
class token's attention over the image patches, the zero-shot lens over layers against ``"a photo
of a {label}"`` text directions, and a patching heatmap between two images. A random model's
figures show the structure of each analysis (shapes, sums, where the effects can sit), not a
meaning. ``--vision DIR`` runs the same on a CLIP or SigLIP checkpoint directory, or on a ViT
classifier (its class directions instead of text).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

RANDOM = "random"
COLOURS = ("red", "green", "blue", "yellow")
KINDS = ("circle", "square", "triangle", "cross")
LABELS = [f"{colour} {kind}" for colour in COLOURS for kind in KINDS]
NOTICE = (
    "This CLIP has random weights: its figures show the shapes of the analyses (which positions "
    "attend where, how a score builds up over layers, where patching can act), not what a trained "
    "model sees. Pass --vision DIR with a real CLIP, SigLIP or ViT checkpoint directory for meaning."
)


def load_vision(source: str, out_dir: Path):
    """``(vision model, directions, label names, normalize)`` for the tour."""
    from transformers import AutoConfig

    import mechscope as ms
    from mechscope.vision import class_directions, load_clip, text_directions, tiny_clip
    from mechscope.vision.tiny import words_of

    if source == RANDOM:
        folder = out_dir / "tiny-clip"
        if not (folder / "config.json").is_file():
            tiny_clip(folder, words_of([f"a photo of a {label}" for label in LABELS]), seed=0)
        source = str(folder)
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        raise ms.LoadError(f"--vision takes a checkpoint directory with a config.json; {source!r} has none")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type in ("clip", "siglip"):
        clip = load_clip(path)
        return clip.vision, text_directions(clip.text, LABELS), LABELS, True
    model = ms.load(path, device="cpu")
    if model.cfg.image_size is None:
        raise ms.LoadError(f"{source} holds a {model_type!r} language model; --vision needs a vision checkpoint")
    directions, names = class_directions(model)
    return model, directions, names, False


def vision_tour(args: argparse.Namespace) -> int:
    """Run the vision tour (see the module docstring); writes HTML and PNG views to ``--out-dir``."""
    import torch

    from mechscope.vision import (
        PatchGrid,
        attention_grid,
        lens,
        lens_names,
        model_view,
        patch_images,
        pixels,
        scores,
        shapes,
        to_patches,
    )
    from mechscope.viz.heatmap import save_heatmaps
    from mechscope.viz.png import save_png
    from mechscope.viz.vision import Overlay, lens_figure, save_overlays_html, save_overlays_png

    torch.manual_seed(0)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, directions, names, normalize = load_vision(args.vision, out_dir)
    cfg, grid = model.cfg, PatchGrid.of(model)
    print(f"== mechscope tour --vision: {cfg.model_name} ({cfg.family}) ==")
    print(
        f"loaded in {time.perf_counter() - start:.1f}s: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} "
        f"heads, {cfg.image_size}px images in a {grid.n_rows}x{grid.n_rows} grid of {cfg.patch_size}px patches "
        f"(+{cfg.n_prefix_tokens} class token), {len(model.hook_dict)} hook points"
    )
    if args.vision == RANDOM:
        print(f"\n{NOTICE}")
    data = shapes(8, size=2 * cfg.image_size, seed=0, colours=COLOURS, kinds=KINDS)
    x = pixels(model, data.images)
    shown = [model_view(model, image) for image in data.images]
    written = []

    with torch.no_grad():
        logits, cache = model.run_with_cache(
            x, names_filter=lambda n: n.endswith("hook_pattern") or n in lens_names(model)
        )
    last = cfg.n_layers - 1
    query = 0 if cfg.class_token else grid.n_positions // 2
    who = "the class token" if cfg.class_token else f"position {query}"
    panels = [
        Overlay(shown[0], attention_grid(cache, last, head, grid, query=query)[0], f"layer {last} head {head}")
        for head in range(cfg.n_heads)
    ]
    title = f"Attention from {who} over the patches of '{data.labels[0]}', last layer"
    written += [save_overlays_html(panels, out_dir / "vision-attention.html", title)]
    written += [save_overlays_png(panels, out_dir / "vision-attention.png", title)]
    entropy = [-(p * p.clamp_min(1e-12).log()).sum().item() for p in (o.grid for o in panels)]
    print(f"\n-- patch attention: {who}, layer {last}, image 0 ('{data.labels[0]}') --")
    print("  entropy over patches by head: " + ", ".join(f"{e:.2f}" for e in entropy))

    with torch.no_grad():
        lensed = lens(model, cache, directions, normalize=normalize)  # [layer + 1, image, label]
    print("\n-- zero-shot lens: top label read from the residual stream entering each layer ('embed' .. final) --")
    rows = ["embed", *[str(layer) for layer in range(1, cfg.n_layers)], "final"]
    for image in range(min(4, len(data))):
        tops = [names[int(i)] for i in lensed[:, image].argmax(-1)]
        print(
            f"  image {image} ({data.labels[image]}): "
            + " | ".join(f"{r}: {t}" for r, t in zip(rows, tops, strict=True))
        )
    fig = lens_figure(lensed[:, 0], names, f"Lens on image 0 ('{data.labels[0]}')", "cosine" if normalize else "logit")
    written += [save_heatmaps([fig], out_dir / "vision-lens.html", "Zero-shot lens over layers")]
    written += [save_png(fig, out_dir / "vision-lens.png")]

    base, source = 1, next(i for i in range(len(data)) if data.labels[i] != data.labels[1])
    final = lensed[-1]  # the model's own scores [image, label]
    label_of = {name: i for i, name in enumerate(names)}
    target = label_of.get(data.labels[source], int(final[source].argmax()))  # the label, else its top class
    other = label_of.get(data.labels[base], int(final[base].argmax()))
    if other == target:
        other = int(final[base].topk(2).indices[1])
    layers = list(range(0, cfg.n_layers, max(1, cfg.n_layers // 4)))  # at most about 4 layers: one pass each

    def metric(batch_logits):
        s = scores(model, batch_logits, directions, normalize)
        return s[:, target] - s[:, other]

    effect = patch_images(model, x[base : base + 1], x[source : source + 1], metric, layers=layers)  # [layer, pos]
    clean = metric(logits[source : source + 1]).item()
    corrupted = metric(logits[base : base + 1]).item()
    maps = to_patches(model, effect - corrupted)  # [layer, n_rows, n_cols]
    panels = [Overlay(shown[base], maps[i], f"resid_pre {layer}") for i, layer in enumerate(layers)]
    title = (
        f"Patching resid_pre from '{data.labels[source]}' into '{data.labels[base]}': change of "
        f"score('{names[target]}') - score('{names[other]}')"
    )
    written += [save_overlays_html(panels, out_dir / "vision-patching.html", title)]
    written += [save_overlays_png(panels, out_dir / "vision-patching.png", title)]
    pair = f"image {source} ('{data.labels[source]}') into image {base} ('{data.labels[base]}')"
    print(f"\n-- activation patching: {pair} --")
    measure = f"score('{names[target]}') - score('{names[other]}')"
    print(f"  metric {measure}: source run {clean:+.4f}, base run {corrupted:+.4f}")
    for i, layer in enumerate(layers):
        row = effect[i] - corrupted
        top = int(row.abs().argmax())
        where = "class token" if top < grid.n_prefix else f"patch {grid.cell(top)}"
        print(f"  layer {layer}: largest change {row[top].item():+.4f} at {where}")

    print(f"\nwrote ({time.perf_counter() - start:.1f}s in all):")
    for path in written:
        print(f"  {path}")
    return 0

"""The IOI section of ``mechscope tour``: patching heatmaps and AtP* top heads in one HTML report."""

from __future__ import annotations

import html
import time
from pathlib import Path

import torch

from mechscope.data.tasks import ioi_dataset
from mechscope.patching.activation import activation_patch
from mechscope.patching.atp_star import atp_star
from mechscope.patching.metrics import LogitDiff, Normalized


def ioi_tour(
    model,
    out_dir: str | Path = "mechscope-tour",
    n_prompts: int | None = None,
    top_k: int = 10,
    *,
    full: bool = False,
    layer_step: int | None = None,
) -> Path:
    """Denoising patching on IOI prompts: residual stream by layer x position, heads by layer x
    head, and AtP* top heads with their exact effects; writes ``ioi_patching.html`` in ``out_dir``.

    The metric is the logit difference (indirect object minus subject) normalised to 0 on the
    corrupted run ("third name" corruption) and 1 on the clean run. By default the section is
    quick (4 prompts; the residual stream at every third layer and the last; every head);
    ``full=True`` uses 8 prompts and every layer. ``n_prompts`` and ``layer_step`` override either.

    Example:
        >>> ioi_tour(ms.load("smollm2-135m"), "mechscope-tour")  # doctest: +SKIP
    """
    from mechscope.viz.heatmap import (
        layer_head_heatmap,
        layer_pos_heatmap,
        save_heatmaps,
        save_png,
    )

    print("\n== IOI: activation patching and AtP* ==")
    n_prompts = n_prompts or (8 if full else 4)
    layer_step = layer_step or (1 if full else 3)
    n_layers = model.cfg.n_layers
    resid_layers = sorted(set(range(0, n_layers, layer_step)) | {n_layers - 1})
    data = ioi_dataset(model, n=n_prompts).to(model.device)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    with torch.no_grad():
        metric = Normalized(LogitDiff(data.correct, data.wrong), model(clean), model(corrupted))
    print(f"{len(data)} prompts, e.g. clean {data.clean_prompts[0]!r} / corrupted {data.corrupted_prompts[0]!r}")
    print(
        f"logit difference (IO - S): clean {float(metric.clean_value):.2f}, corrupted {float(metric.corrupted_value):.2f}"
    )
    start = time.perf_counter()
    final = {"logit_positions": -1}  # the metric reads the final position only
    resid = activation_patch(
        model, clean, corrupted, metric, "resid_pre", layers=resid_layers, progress=True, **final
    ).cpu()
    heads = activation_patch(model, clean, corrupted, metric, "z", progress=True, **final).cpu()
    t_sweeps = time.perf_counter() - start
    n_pos, n_heads = clean.shape[1], model.cfg.n_heads
    print(
        f"patched {resid.numel() + heads.numel()} sites ({len(data)} prompts each; residual stream at "
        f"{len(resid_layers)} of {n_layers} layers) in {t_sweeps:.1f}s"
        + ("" if full else "; --ioi-full patches every layer with 8 prompts")
    )
    start = time.perf_counter()
    star = atp_star(model, clean, corrupted, metric, top_k=top_k, **final)
    t_star = time.perf_counter() - start
    print(f"AtP* over {heads.numel()} heads, {len(star.candidates)} verified exactly, in {t_star:.1f}s")
    print(f"  {'head':<8}{'AtP*':>9}{'exact':>9}{'sweep':>9}")
    rows = []
    for layer, head in star.top.tolist():
        i = star.candidates.tolist().index([layer, head])
        values = (float(star.estimates[layer, head]), float(star.verified[i]), float(heads[layer, head]))
        print(f"  L{layer}H{head:<5}{values[0]:>9.3f}{values[1]:>9.3f}{values[2]:>9.3f}")
        rows.append(f"<tr><td>L{layer}H{head}</td>" + "".join(f"<td>{v:.3f}</td>" for v in values) + "</tr>")
    tokens = model.to_str_tokens(clean[0])
    figures = [
        layer_pos_heatmap(
            resid, tokens, "Residual stream (resid_pre), denoising: normalised logit difference", "metric", resid_layers
        ),
        layer_head_heatmap(heads, "Head outputs (z, all positions), denoising: normalised logit difference", "metric"),
    ]
    table = (
        f"<h3>AtP* top {len(rows)} heads (change of the normalised metric; exact = verified patch, "
        "patched metric = the exhaustive sweep)</h3><table><tr><th>head</th><th>AtP* estimate</th><th>exact effect</th>"
        f"<th>patched metric</th></tr>{''.join(rows)}</table>"
    )
    intro = (
        f"<p>{html.escape(model.cfg.model_name)}: {len(data)} IOI prompts of {n_pos} tokens, for example "
        f"<code>{html.escape(data.clean_prompts[0])}</code> (corrupted: <code>{html.escape(data.corrupted_prompts[0])}"
        "</code>). 0 = corrupted run, 1 = clean run.</p>"
    )
    path = save_heatmaps(figures, Path(out_dir) / "ioi_patching.html", "IOI patching", intro, ["", table])
    pngs = [save_png(fig, Path(out_dir) / f"ioi_{name}.png") for fig, name in zip(figures, ("resid", "heads"))]
    print(f"IOI report ({n_heads} heads x {model.cfg.n_layers} layers): {path}")
    if all(pngs):
        print(f"  heatmaps as PNG: {', '.join(str(p) for p in pngs)}")
    return path

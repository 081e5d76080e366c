"""Patching benchmark: mechscope's batched sweeps and AtP* against TransformerLens.

On the bundled SmolLM2-135M (fp32, CPU, torch.set_num_threads(2)) and one batch of IOI
prompts (mechscope.data.ioi_dataset, template 0, "third_name" corruption; the same token ids
for every contender), with the mean logit difference (indirect object minus subject) as the
metric, denoising direction (corrupted run, clean activations patched in):

  * the residual-stream sweep, layer x position (mechscope ``activation_patch(...,
    "resid_pre")`` vs TransformerLens ``patching.get_act_patch_resid_pre``), and the all-heads
    sweep, layer x head, every position (``activation_patch(..., "z")`` vs
    ``get_act_patch_attn_head_out_all_pos``), on the layers 0, s, 2s, ... (``--layer-step s``,
    default 3, so that TransformerLens' one-forward-per-patch sweeps fit in a few minutes; 1 is
    the full grid; TransformerLens gets the same cells through its ``index_df``): wall time of
    one sweep, the time ratio, and the largest absolute difference between the result grids;
  * AtP* (QK fix, GradDrop, verification of the 20 best-scored heads, top 10 kept) against
    exhaustive head patching: Spearman correlation of the AtP* estimates with the exact
    effects, recall of the exact top-10 heads (by |effect|), and the time ratio against the
    exhaustive head sweep over every layer, mechscope's measured and TransformerLens'
    scaled from its measured layers to all layers;
  * mechscope against its own slower paths on the same sweep: the residual sweep recomputing
    every position (``reuse_prefix=False``) against reusing the base run before each patched
    position, and AtP*'s GradDrop gradients from one batched copy per dropped layer
    (``gradient_pass``) against one forward and partial backwards (``graddrop_pass``);
  * the CPU other processes took while timing (the machine has 2 cores).

TransformerLens runs in its own venvs (benchmarks/.venv-tl: transformer-lens 3.9 via sae-lens,
classic HookedTransformer loaded without weight processing; benchmarks/.venv-tl4:
transformer-lens 4.3 TransformerBridge), each in a subprocess of this script
(``--worker tl3|tl4``), on the local HF copy of the same GGUF weights.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/patching.py [--prompts 2] [--layer-step 3] [--skip-tl] [--skip-atp]
                                            [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)
PEERS = {"tl3": "TL 3.9 HookedTransformer", "tl4": "TL 4.3 TransformerBridge"}


def _metric_fn(correct: torch.Tensor, wrong: torch.Tensor):
    """Mean over prompts of the final-position logit difference (a scalar, as TL expects)."""

    def metric(logits):
        final = logits[:, -1]
        rows = torch.arange(final.shape[0])
        return (final[rows, correct] - final[rows, wrong]).mean()

    return metric


def worker(name: str, data_path: str, out_path: str) -> None:
    """Runs inside a peer venv: both TransformerLens sweeps on the saved prompts and layers."""
    import forward_worker as fw
    import pandas as pd
    from transformer_lens import patching

    data = torch.load(data_path, weights_only=True)
    clean, corrupted, layers = data["clean"], data["corrupted"], data["layers"].tolist()
    metric = _metric_fn(data["correct"], data["wrong"])
    model = fw.CONTENDERS[name]().model
    sweeps = {
        "resid": (patching.get_act_patch_resid_pre, "pos", clean.shape[1]),
        "heads": (patching.get_act_patch_attn_head_out_all_pos, "head", model.cfg.n_heads),
    }
    out = {}
    with torch.no_grad():
        model(clean)  # warm-up
        _, clean_cache = model.run_with_cache(clean)
        for key, (fn, axis, size) in sweeps.items():
            index_df = pd.DataFrame([(layer, i) for layer in layers for i in range(size)], columns=["layer", axis])
            start = time.perf_counter()
            result = fn(model, corrupted, clean_cache, metric, index_axis_names=None, index_df=index_df)
            seconds = time.perf_counter() - start
            out[key] = {"seconds": seconds, "result": result.float().reshape(len(layers), size).tolist()}
    Path(out_path).write_text(json.dumps(out))


def run_peer(name: str, data_path: str) -> dict:
    python = common.ensure_peer_venv(name, log=lambda m: print(m, flush=True))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    cmd = [str(python), __file__, "--worker", name, "--data", data_path, "--out", out_path]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        return {"error": tail}
    return json.loads(Path(out_path).read_text())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack((ra, rb)))[0, 1])


def atp_section(model, clean, corrupted, metric, heads, figures, timed, kw) -> None:
    """AtP* against exhaustive head patching (every layer), both from mechscope."""
    from mechscope.patching import activation_patch, atp_star

    if heads is None:
        heads, _ = timed(
            lambda: activation_patch(model, clean, corrupted, metric, "z", **kw), "heads sweep, all layers"
        )
        t_full = figures["_last_timed"]
    else:
        t_full = figures["mechscope"]["heads_s"]
    star, t_star = timed(lambda: atp_star(model, clean, corrupted, metric, top_k=10, **kw), "AtP*")
    star_nogd, t_nogd = timed(
        lambda: atp_star(model, clean, corrupted, metric, top_k=10, graddrop=False, **kw), "AtP* without GradDrop"
    )
    with torch.no_grad():
        exact = heads - metric(model(corrupted)).mean()
    exact_top = set(exact.abs().flatten().argsort(descending=True)[:10].tolist())
    n_heads = model.cfg.n_heads

    def recall(result) -> float:
        found = {int(layer) * n_heads + int(head) for layer, head in result.top.tolist()}
        return len(found & exact_top) / 10

    figures["atp_star"] = {
        "seconds": t_star,
        "seconds_no_graddrop": t_nogd,
        "exhaustive_heads_s": t_full,
        "spearman_estimates": spearman(star.estimates, exact),
        "spearman_graddrop_scores_vs_abs": spearman(star.scores, exact.abs()),
        "spearman_no_graddrop_abs": spearman(star_nogd.scores, exact.abs()),
        "recall_top10": recall(star),
        "recall_top10_no_graddrop": recall(star_nogd),
    }


def graddrop_section(model, clean, corrupted, metric, figures, timed) -> None:
    """AtP*'s GradDrop gradients: one forward and partial backwards vs one batched copy per layer."""
    from mechscope.patching.atp_star import graddrop_pass, head_names
    from mechscope.patching.attribution import gradient_pass

    n_layers = model.cfg.n_layers
    names = [name for layer in range(n_layers) for name in head_names(model, layer)]
    (_, fast), t_fast = timed(
        lambda: graddrop_pass(model, corrupted, names, metric), "GradDrop gradients (graddrop_pass)"
    )
    (_, copies), t_copies = timed(
        lambda: gradient_pass(model, corrupted, names, metric, [None, *range(n_layers)]),
        "GradDrop gradients, one batched copy per layer (gradient_pass)",
    )
    diff = max(float((fast[n] - copies[n]).abs().max()) for n in names)
    figures["graddrop"] = {
        "graddrop_pass_s": t_fast,
        "batched_copies_s": t_copies,
        "ratio": t_copies / t_fast,
        "max_abs_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help="IOI prompts in the batch")
    parser.add_argument(
        "--layer-step", type=int, default=3, help="sweep comparison on layers 0, step, 2*step, ... (1: the full grid)"
    )
    parser.add_argument("--skip-tl", action="store_true", help="mechscope only")
    parser.add_argument("--skip-atp", action="store_true", help="sweeps only, no AtP* section")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    parser.add_argument("--worker", choices=sorted(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.out)
        return

    import mechscope as ms
    from mechscope.data import ioi_dataset
    from mechscope.patching import LogitDiff, activation_patch

    common.ensure_hf_dir()
    model = ms.load("smollm2-135m", device="cpu")
    data = ioi_dataset(model, n=args.prompts, seed=0)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    metric = LogitDiff(data.correct, data.wrong)
    print(f"SmolLM2-135M, {len(data)} IOI prompts x {clean.shape[1]} tokens, e.g. {data.clean_prompts[0]!r}")
    monitor = common.CpuMonitor()

    figures: dict = {}

    def timed(fn, label):
        start = time.perf_counter()
        value = fn()
        figures["_last_timed"] = seconds = time.perf_counter() - start
        print(f"  mechscope {label}: {seconds:.1f}s", flush=True)
        return value, seconds

    # The metric reads the final position only, so only that position is unembedded.
    kw = {"logit_positions": -1}
    n_layers = model.cfg.n_layers
    layers = list(range(0, n_layers, args.layer_step))
    activation_patch(model, clean, corrupted, metric, "resid_pre", layers=[n_layers - 1], **kw)  # warm-up
    resid, t_resid = timed(
        lambda: activation_patch(model, clean, corrupted, metric, "resid_pre", layers=layers, **kw), "resid sweep"
    )
    full_length, t_full_length = timed(
        lambda: activation_patch(model, clean, corrupted, metric, "resid_pre", layers=layers, reuse_prefix=False, **kw),
        "resid sweep, every position recomputed (reuse_prefix=False)",
    )
    heads, t_heads = timed(
        lambda: activation_patch(model, clean, corrupted, metric, "z", layers=layers, **kw), "heads sweep"
    )
    figures.update(
        {
            "prompts": len(data),
            "tokens": clean.shape[1],
            "layers": layers,
            "mechscope": {"resid_s": t_resid, "heads_s": t_heads},
            "prefix_reuse": {
                "full_length_s": t_full_length,
                "suffix_s": t_resid,
                "ratio": t_full_length / t_resid,
                "max_abs_diff": float((full_length - resid).abs().max()),
            },
        }
    )
    if not args.skip_atp:
        graddrop_section(model, clean, corrupted, metric, figures, timed)
        atp_section(model, clean, corrupted, metric, heads if len(layers) == n_layers else None, figures, timed, kw)
    peers = {}
    if not args.skip_tl:
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            torch.save(
                {
                    "clean": clean,
                    "corrupted": corrupted,
                    "correct": data.correct,
                    "wrong": data.wrong,
                    "layers": torch.tensor(layers),
                },
                f.name,
            )
            for name in PEERS:
                print(f"running {PEERS[name]} ...", flush=True)
                peers[name] = run_peer(name, f.name)
    other, steal = monitor.other_cores()
    figures["cpu_other_cores"], figures["cpu_steal_cores"] = other, steal

    print(f"\n{'sweep':<28}{'mechscope':>12}" + "".join(f"{PEERS[p]:>28}" for p in peers))
    for key, mine, t_mine, label in (
        ("resid", resid, t_resid, "resid_pre layer x pos"),
        ("heads", heads, t_heads, "head out layer x head"),
    ):
        row = f"{label:<28}{t_mine:>11.1f}s"
        for name, peer in peers.items():
            if "error" in peer:
                row += f"{'error':>28}"
                continue
            theirs = torch.tensor(peer[key]["result"])
            diff = float((theirs - mine).abs().max())
            ratio = peer[key]["seconds"] / t_mine
            figures.setdefault(name, {})[key] = {"seconds": peer[key]["seconds"], "ratio": ratio, "max_abs_diff": diff}
            row += f"{peer[key]['seconds']:>9.1f}s ({ratio:5.1f}x, diff {diff:.1e})"
        print(row)
    for name, peer in peers.items():
        if "error" in peer:
            print(f"{PEERS[name]} failed:\n{peer['error']}")
    r = figures["prefix_reuse"]
    print(
        f"\nresid sweep reusing the base run before each patched position: {r['ratio']:.2f}x faster than "
        f"recomputing every position ({r['full_length_s']:.1f}s -> {r['suffix_s']:.1f}s), "
        f"max diff {r['max_abs_diff']:.1e}"
    )
    if "graddrop" in figures:
        g = figures["graddrop"]
        print(
            f"GradDrop gradients: {g['ratio']:.2f}x faster than one batched copy per layer "
            f"({g['batched_copies_s']:.1f}s -> {g['graddrop_pass_s']:.1f}s), max diff {g['max_abs_diff']:.1e}"
        )
    if "atp_star" in figures:
        a = figures["atp_star"]
        t_full = a["exhaustive_heads_s"]
        print(
            f"\nAtP* (QK fix, GradDrop, 20 verified): {a['seconds']:.1f}s; "
            f"without GradDrop {a['seconds_no_graddrop']:.1f}s"
        )
        print(
            f"  Spearman(AtP* estimates, exact head effects) = {a['spearman_estimates']:.3f}; "
            f"Spearman(GradDrop score, |exact|) = {a['spearman_graddrop_scores_vs_abs']:.3f}"
        )
        print(
            f"  recall of the exact top-10 heads: {a['recall_top10']:.1f} "
            f"(without GradDrop {a['recall_top10_no_graddrop']:.1f})"
        )
        line = (
            f"  time ratio vs exhaustive head patching (all {n_layers} layers): mechscope {t_full / a['seconds']:.1f}x"
        )
        for name, peer in peers.items():
            if "error" not in peer:
                full = peer["heads"]["seconds"] * n_layers / len(layers)
                a[f"{name}_exhaustive_heads_s_extrapolated"] = full
                line += f", {PEERS[name]} {full / a['seconds']:.1f}x (its time scaled to all layers)"
        print(line)
    print(f"\nother processes used {other:.2f} cores (steal {steal:.2f}) while timing")
    if args.json:
        figures.pop("_last_timed", None)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

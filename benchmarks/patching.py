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
    the full grid; TransformerLens gets the same cells through its ``index_df``). mechscope's
    headline is the documented default call (its metric declares the one position it reads, so
    only that position is unembedded); the like-for-like row unembeds every position, as
    TransformerLens must (``logit_positions=None``). Reported: the median and spread of the
    interleaved repetitions, the time ratios and the largest absolute difference of the grids;
  * AtP* (QK fix, GradDrop, verification of the 20 best-scored heads, top 10 kept) against
    exhaustive head patching: Spearman correlation of the AtP* estimates with the exact
    effects, recall of the exact top-10 heads (by |effect|), and the time ratio against the
    exhaustive head sweep over every layer, mechscope's measured and TransformerLens'
    scaled from its measured layers to all layers;
  * mechscope against its own slower paths on the same sweep: the residual sweep recomputing
    every position (``reuse_prefix=False``) against reusing the base run before each patched
    position, and AtP*'s GradDrop gradients from one batched copy per dropped layer
    (``gradient_pass``) against one forward and partial backwards (``graddrop_pass``).

Every timed call runs ``--reps`` times (default 3), interleaved round by round with every other
call, TransformerLens included (its workers stay loaded and time one sweep per request); a
sample during which other processes took more than 0.25 cores is discarded and retaken
(``common.interleave``), and the report ends with the largest load seen.

TransformerLens runs in its own venvs (benchmarks/.venv-tl: transformer-lens 3.9 via sae-lens,
classic HookedTransformer loaded without weight processing; benchmarks/.venv-tl4:
transformer-lens 4.3 TransformerBridge), each in a subprocess of this script
(``--worker tl3|tl4 --serve``), on the local HF copy of the same GGUF weights.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/patching.py [--prompts 2] [--layer-step 3] [--reps 3] [--skip-tl]
                                            [--skip-atp] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
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


class PeerSweeps:
    """Runs inside a peer venv (``--worker NAME --serve``): loads TransformerLens once, then times
    one sweep per request, so that the parent can interleave its sweeps with mechscope's."""

    def __init__(self, name: str):
        self.name = name
        self.model = None

    def load(self, request: dict) -> dict:
        import forward_worker as fw

        data = torch.load(request["data"], weights_only=True)
        self.clean, self.corrupted = data["clean"], data["corrupted"]
        self.layers = data["layers"].tolist()
        self.metric = _metric_fn(data["correct"], data["wrong"])
        self.model = fw.CONTENDERS[self.name]().model
        with torch.no_grad():
            self.model(self.clean)  # warm-up
            _, self.clean_cache = self.model.run_with_cache(self.clean)
        return {}

    def sweep(self, request: dict) -> dict:
        import pandas as pd
        from transformer_lens import patching

        fn, axis, size = {
            "resid": (patching.get_act_patch_resid_pre, "pos", self.clean.shape[1]),
            "heads": (patching.get_act_patch_attn_head_out_all_pos, "head", self.model.cfg.n_heads),
        }[request["key"]]
        index_df = pd.DataFrame([(layer, i) for layer in self.layers for i in range(size)], columns=["layer", axis])
        with torch.no_grad():
            start = time.perf_counter()
            result = fn(
                self.model, self.corrupted, self.clean_cache, self.metric, index_axis_names=None, index_df=index_df
            )
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "result": result.float().reshape(len(self.layers), size).tolist()}


def serve_worker(name: str) -> None:
    peer = PeerSweeps(name)
    common.serve({"load": peer.load, "sweep": peer.sweep})


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.flatten().argsort().argsort().double()
    rb = b.flatten().argsort().argsort().double()
    return float(torch.corrcoef(torch.stack((ra, rb)))[0, 1])


def atp_figures(model, metric, corrupted, timings: dict) -> dict:
    """AtP* against exhaustive head patching (every layer), both from mechscope, from the timed jobs' results."""
    heads = timings["heads sweep, all layers"]["last"]
    star, star_nogd = timings["AtP*"]["last"], timings["AtP* without GradDrop"]["last"]
    with torch.no_grad():
        exact = heads - metric(model(corrupted)).mean()
    exact_top = set(exact.abs().flatten().argsort(descending=True)[:10].tolist())
    n_heads = model.cfg.n_heads

    def recall(result) -> float:
        found = {int(layer) * n_heads + int(head) for layer, head in result.top.tolist()}
        return len(found & exact_top) / 10

    return {
        "spearman_estimates": spearman(star.estimates, exact),
        "spearman_graddrop_scores_vs_abs": spearman(star.scores, exact.abs()),
        "spearman_no_graddrop_abs": spearman(star_nogd.scores, exact.abs()),
        "recall_top10": recall(star),
        "recall_top10_no_graddrop": recall(star_nogd),
    }


def fmt_time(stats: dict) -> str:
    """``median s (spread %)``."""
    return f"{stats['median_s']:.2f}s ±{100 * stats['spread'] / 2:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help="IOI prompts in the batch")
    parser.add_argument(
        "--layer-step", type=int, default=3, help="sweep comparison on layers 0, step, 2*step, ... (1: the full grid)"
    )
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of every contender, interleaved")
    parser.add_argument(
        "--gate", type=float, default=common.MAX_OTHER_CORES, help="retake samples while others take more cores"
    )
    parser.add_argument("--skip-tl", action="store_true", help="mechscope only")
    parser.add_argument("--skip-atp", action="store_true", help="sweeps only, no AtP* section")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    parser.add_argument("--worker", choices=sorted(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_worker(args.worker)
        return

    import mechscope as ms
    from mechscope.data import ioi_dataset
    from mechscope.patching import LogitDiff, activation_patch, atp_star
    from mechscope.patching.atp_star import graddrop_pass, head_names
    from mechscope.patching.attribution import gradient_pass

    common.ensure_hf_dir()
    model = ms.load("smollm2-135m", device="cpu")
    data = ioi_dataset(model, n=args.prompts, seed=0)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    metric = LogitDiff(data.correct, data.wrong)
    n_layers = model.cfg.n_layers
    layers = list(range(0, n_layers, args.layer_step))
    print(f"SmolLM2-135M, {len(data)} IOI prompts x {clean.shape[1]} tokens, e.g. {data.clean_prompts[0]!r}")
    print(f"sweeps on layers {layers}; {args.reps} interleaved repetitions of every contender", flush=True)

    def sweep(site, **kw):
        return lambda: activation_patch(model, clean, corrupted, metric, site, layers=layers, **kw)

    # The documented default call first; the others are labelled rows.
    jobs = {
        "resid sweep": sweep("resid_pre"),
        "heads sweep": sweep("z"),
        "resid sweep, every position unembedded": sweep("resid_pre", logit_positions=None),
        "heads sweep, every position unembedded": sweep("z", logit_positions=None),
        "resid sweep, reuse_prefix=False": sweep("resid_pre", reuse_prefix=False),
    }
    if not args.skip_atp:
        names = [name for layer in range(n_layers) for name in head_names(model, layer)]
        jobs.update(
            {
                "heads sweep, all layers": lambda: activation_patch(model, clean, corrupted, metric, "z"),
                "AtP*": lambda: atp_star(model, clean, corrupted, metric, top_k=10),
                "AtP* without GradDrop": lambda: atp_star(model, clean, corrupted, metric, top_k=10, graddrop=False),
                "GradDrop gradients (graddrop_pass)": lambda: graddrop_pass(model, corrupted, names, metric),
                "GradDrop gradients, one batched copy per layer": lambda: gradient_pass(
                    model, corrupted, names, metric, [None, *range(n_layers)]
                ),
            }
        )
    for fn in jobs.values():  # warm-up
        fn()

    workers: dict[str, common.Worker] = {}
    tmp = Path(tempfile.mkdtemp(prefix="mechscope-bench-patching-"))
    if not args.skip_tl:
        data_path = tmp / "data.pt"
        torch.save(
            {
                "clean": clean,
                "corrupted": corrupted,
                "correct": data.correct,
                "wrong": data.wrong,
                "layers": torch.tensor(layers),
            },
            data_path,
        )
        for name, label in PEERS.items():
            print(f"loading {label} in its venv ...", flush=True)
            try:
                python = common.ensure_peer_venv(name, log=lambda m: print(m, flush=True))
                worker = common.Worker(python, [__file__, "--worker", name, "--serve"], tmp / f"{name}.log")
                worker.request({"op": "load", "data": str(data_path)})
            except RuntimeError as exc:
                print(f"{label} unavailable:\n{exc}")
                continue
            workers[name] = worker
            for key in ("resid", "heads"):
                jobs[f"{label} {key} sweep"] = lambda w=worker, k=key: w.request({"op": "sweep", "key": k})

    timings = common.interleave(jobs, reps=args.reps, max_other=args.gate)
    for worker in workers.values():
        worker.close()

    figures: dict = {
        "prompts": len(data),
        "tokens": clean.shape[1],
        "layers": layers,
        "reps": args.reps,
        "timings": {name: {k: v for k, v in t.items() if k != "last"} for name, t in timings.items()},
        "gate": common.gate_note(timings, args.gate),
        "ratios": {},
    }
    print(f"\n{'timed call':<52}{'median':>9}{'spread':>9}")
    for name, t in timings.items():
        flag = "" if t["recordable"] else "  (not recordable: load)"
        print(f"{name:<52}{t['median_s']:>8.2f}s{100 * t['spread']:>8.0f}%{flag}")

    print("\npeer / mechscope time ratios (medians); max abs difference of the result grids:")
    for key, site_label in (("resid", "resid_pre layer x pos"), ("heads", "head out layer x head")):
        mine = timings[f"{key} sweep"]
        alike = timings[f"{key} sweep, every position unembedded"]
        for name, label in PEERS.items():
            peer = timings.get(f"{label} {key} sweep")
            if peer is None:
                continue
            diff = float((torch.tensor(peer["last"]["result"]) - mine["last"]).abs().max())
            default_ratio = peer["median_s"] / mine["median_s"]
            alike_ratio = peer["median_s"] / alike["median_s"]
            figures["ratios"][f"{name} {key}"] = {
                "default_call": default_ratio,
                "like_for_like": alike_ratio,
                "max_abs_diff": diff,
            }
            print(
                f"  {site_label:<24} {label:<26} default call {default_ratio:5.1f}x, "
                f"like for like (every position unembedded) {alike_ratio:5.1f}x, diff {diff:.1e}"
            )
    reuse = timings["resid sweep, reuse_prefix=False"]["median_s"] / timings["resid sweep"]["median_s"]
    reuse_diff = float(
        (timings["resid sweep, reuse_prefix=False"]["last"] - timings["resid sweep"]["last"]).abs().max()
    )
    figures["prefix_reuse"] = {"ratio": reuse, "max_abs_diff": reuse_diff}
    print(
        f"\nresid sweep reusing the base run before each patched position: {reuse:.2f}x faster, diff {reuse_diff:.1e}"
    )
    if not args.skip_atp:
        fast = timings["GradDrop gradients (graddrop_pass)"]
        copies = timings["GradDrop gradients, one batched copy per layer"]
        gd_diff = max(float((fast["last"][1][n] - copies["last"][1][n]).abs().max()) for n in names)
        figures["graddrop"] = {"ratio": copies["median_s"] / fast["median_s"], "max_abs_diff": gd_diff}
        print(f"GradDrop gradients: {figures['graddrop']['ratio']:.2f}x faster than one batched copy per layer, "
              f"diff {gd_diff:.1e}")  # fmt: skip
        atp = atp_figures(model, metric, corrupted, timings)
        t_star = timings["AtP*"]["median_s"]
        t_full = timings["heads sweep, all layers"]["median_s"]
        atp["vs_mechscope_exhaustive"] = t_full / t_star
        print(
            f"\nAtP* (QK fix, GradDrop, 20 verified): {fmt_time(timings['AtP*'])}; "
            f"without GradDrop {fmt_time(timings['AtP* without GradDrop'])}"
        )
        print(
            f"  Spearman(AtP* estimates, exact head effects) = {atp['spearman_estimates']:.3f}; "
            f"Spearman(GradDrop score, |exact|) = {atp['spearman_graddrop_scores_vs_abs']:.3f}"
        )
        print(f"  recall of the exact top-10 heads: {atp['recall_top10']:.1f} "
              f"(without GradDrop {atp['recall_top10_no_graddrop']:.1f})")  # fmt: skip
        line = f"  time ratio vs exhaustive head patching (all {n_layers} layers): mechscope {t_full / t_star:.1f}x"
        for name, label in PEERS.items():
            peer = timings.get(f"{label} heads sweep")
            if peer is not None:
                full = peer["median_s"] * n_layers / len(layers)
                atp[f"vs_{name}_exhaustive_extrapolated"] = full / t_star
                line += f", {label} {full / t_star:.1f}x (its time scaled to all layers)"
        print(line)
        figures["atp_star"] = atp
    print("\n" + figures["gate"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

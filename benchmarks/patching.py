"""Patching benchmark: mechscope's batched sweeps and AtP* against TransformerLens.

On the bundled SmolLM2-135M (fp32, CPU, torch.set_num_threads(2)) and one batch of IOI
prompts (mechscope.data.ioi_dataset, template 0, "third_name" corruption; the same token ids
for every contender), with the mean logit difference (indirect object minus subject) as the
metric, denoising direction (corrupted run, clean activations patched in):

  * the full residual-stream sweep, layer x position (mechscope ``activation_patch(...,
    "resid_pre")`` vs TransformerLens ``patching.get_act_patch_resid_pre``), and the all-heads
    sweep, layer x head, every position (``activation_patch(..., "z")`` vs
    ``get_act_patch_attn_head_out_all_pos``): wall time of one complete sweep, the time ratio,
    and the largest absolute difference between the two result grids;
  * AtP* (QK fix, GradDrop, verification of the 20 best-scored heads, top 10 kept) against
    exhaustive head patching: Spearman correlation of the AtP* estimates with the exact
    effects, recall of the exact top-10 heads (by |effect|), and the time ratio against the
    exhaustive sweeps of mechscope and of TransformerLens;
  * the CPU other processes took while timing (the machine has 2 cores).

TransformerLens runs in its own venvs (benchmarks/.venv-tl: transformer-lens 3.9 via sae-lens,
classic HookedTransformer loaded without weight processing; benchmarks/.venv-tl4:
transformer-lens 4.3 TransformerBridge), each in a subprocess of this script
(``--worker tl3|tl4``), on the local HF copy of the same GGUF weights.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/patching.py [--prompts 4] [--skip-tl] [--json out.json]
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
    """Runs inside a peer venv: both TransformerLens sweeps on the saved prompts."""
    import forward_worker as fw
    from transformer_lens import patching

    data = torch.load(data_path, weights_only=True)
    clean, corrupted = data["clean"], data["corrupted"]
    metric = _metric_fn(data["correct"], data["wrong"])
    model = fw.CONTENDERS[name]().model
    out = {}
    with torch.no_grad():
        model(clean)  # warm-up
        _, clean_cache = model.run_with_cache(clean)
        for key, fn in (("resid", patching.get_act_patch_resid_pre), ("heads", patching.get_act_patch_attn_head_out_all_pos)):
            start = time.perf_counter()
            result = fn(model, corrupted, clean_cache, metric)
            out[key] = {"seconds": time.perf_counter() - start, "result": result.float().tolist()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="IOI prompts in the batch")
    parser.add_argument("--skip-tl", action="store_true", help="mechscope only")
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
    from mechscope.patching import LogitDiff, activation_patch, atp_star

    common.ensure_hf_dir()
    model = ms.load("smollm2-135m", device="cpu")
    data = ioi_dataset(model, n=args.prompts, seed=0)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    metric = LogitDiff(data.correct, data.wrong)
    print(f"SmolLM2-135M, {len(data)} IOI prompts x {clean.shape[1]} tokens, e.g. {data.clean_prompts[0]!r}")
    monitor = common.CpuMonitor()

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    # The metric reads the final position only, so only that position is unembedded.
    kw = {"logit_positions": -1}
    activation_patch(model, clean, corrupted, metric, "resid_pre", layers=[29], **kw)  # warm-up
    resid, t_resid = timed(lambda: activation_patch(model, clean, corrupted, metric, "resid_pre", **kw))
    heads, t_heads = timed(lambda: activation_patch(model, clean, corrupted, metric, "z", **kw))
    star, t_star = timed(lambda: atp_star(model, clean, corrupted, metric, top_k=10, **kw))
    star_nogd, t_star_nogd = timed(lambda: atp_star(model, clean, corrupted, metric, top_k=10, graddrop=False, **kw))
    with torch.no_grad():
        base = metric(model(corrupted)).mean()
    exact = heads - base
    exact_top = set(exact.abs().flatten().argsort(descending=True)[:10].tolist())
    n_heads = model.cfg.n_heads

    def recall(result) -> float:
        found = {int(layer) * n_heads + int(head) for layer, head in result.top.tolist()}
        return len(found & exact_top) / 10

    figures = {
        "prompts": len(data), "tokens": clean.shape[1],
        "mechscope": {"resid_s": t_resid, "heads_s": t_heads, "atp_star_s": t_star, "atp_star_no_graddrop_s": t_star_nogd},
        "atp_star": {
            "spearman_estimates": spearman(star.estimates, exact),
            "spearman_graddrop_scores_vs_abs": spearman(star.scores, exact.abs()),
            "recall_top10": recall(star),
            "recall_top10_no_graddrop": recall(star_nogd),
            "spearman_no_graddrop_abs": spearman(star_nogd.scores, exact.abs()),
        },
    }
    peers = {}
    if not args.skip_tl:
        with tempfile.NamedTemporaryFile(suffix=".pt", delete=False) as f:
            torch.save({"clean": clean, "corrupted": corrupted, "correct": data.correct, "wrong": data.wrong}, f.name)
            for name in PEERS:
                print(f"running {PEERS[name]} ...", flush=True)
                peers[name] = run_peer(name, f.name)
    other, steal = monitor.other_cores()
    figures["cpu_other_cores"], figures["cpu_steal_cores"] = other, steal

    print(f"\n{'sweep':<28}{'mechscope':>12}" + "".join(f"{PEERS[p]:>28}" for p in peers))
    for key, mine, t_mine, label in (("resid", resid, t_resid, "resid_pre layer x pos"), ("heads", heads, t_heads, "head out layer x head")):
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
    a = figures["atp_star"]
    print(f"\nAtP* (QK fix + GradDrop, 20 verified): {t_star:.1f}s; without GradDrop {t_star_nogd:.1f}s")
    print(f"  Spearman(AtP* estimates, exact head effects) = {a['spearman_estimates']:.3f}; "
          f"Spearman(GradDrop score, |exact|) = {a['spearman_graddrop_scores_vs_abs']:.3f}")
    print(f"  recall of the exact top-10 heads: {a['recall_top10']:.1f} (without GradDrop {a['recall_top10_no_graddrop']:.1f})")
    print(f"  time ratio vs exhaustive head patching: mechscope {t_heads / t_star:.1f}x"
          + "".join(f", {PEERS[n]} {p['heads']['seconds'] / t_star:.1f}x" for n, p in peers.items() if "error" not in p))
    print(f"\nother processes used {other:.2f} cores (steal {steal:.2f}) while timing")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

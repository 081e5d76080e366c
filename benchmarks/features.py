"""Feature dashboards: mechscope against SAEDashboard on the same SAE, corpus and tokens.

    .venv/bin/python benchmarks/features.py [--rows 800] [--floor-rows 200] [--rounds 3] [--skip-saedash] [--features N]

An SAELens-format TopK SAE (d_sae 2048, k 32; random unit-norm decoder, encoder its transpose,
seed 0) on ``blocks.6.hook_resid_post`` of the bundled SmolLM2-135M, the first ``rows`` x 128
tokens of the default corpus (no BOS, as SmolLM2 is used). Measured:

(a) mechscope's whole dashboard generation: one harvesting pass, the SQLite database (logit
    effects, neighbours), the static site (a page per feature) and the Neuronpedia JSON; and
    SAEDashboard 0.8.0's ``SaeVisRunner`` with its Neuronpedia runner's layout (top 20, five
    quantile groups of 5, histograms, logit tables, feature tables; activations cached on disk)
    plus its Neuronpedia JSON conversion, in ``benchmarks/.venv-saedash`` (TransformerLens 2.17
    on the same local weights, unprocessed, with SmolLM2's rotary base set: TransformerLens 2.17
    leaves Llama-architecture checkpoints at its default 10,000; the worker stops unless the two
    models' layer-6 activations agree to float32 rounding):
    tokens/s and peak RSS over the resident model;
(b) harvesting alone against the model's forward to the hooked layer (the limit), the forward
    timed over ``floor-rows`` rows as a third contender in the same interleaved rounds;
(c) agreement: every feature's top examples (positions and values) and density; histograms
    compared on SAEDashboard's bins; printed as one line at the end. A quick agreement check:
    ``--rows 4 --floor-rows 2 --features 64``.
The two generations are interleaved (``common.interleave``: ``--rounds`` rounds, rotated order, a
round taken while other processes used more than the gate is retaken); SAEDashboard runs in a
fresh worker process each round and times its own generation (its model load is not counted).
Median and spread are reported.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

import mechscope as ms  # noqa: E402
from mechscope.data.corpus import cached_token_stream, default_corpus_texts  # noqa: E402
from mechscope.features import HarvestConfig, export_site, harvest, write_harvest  # noqa: E402
from mechscope.features.neuronpedia import export_neuronpedia  # noqa: E402
from mechscope.sae import SAEConfig, make_sae, save_sae  # noqa: E402

HOOK, CONTEXT = "blocks.6.hook_resid_post", 128
NEAR_TIE = 1e-3
"""Top values closer than this count as a tie (layer-6 activations differ by up to 4e-4 between the tools)."""
# pyarrow < 18: the newer ones need NumPy 2, and this stack keeps NumPy 1.26
SAEDASH = (common.BENCH_DIR / ".venv-saedash", ["sae-dashboard==0.8.0", "pyarrow<18"])


def ensure_saedash_venv() -> Path:
    """``benchmarks/.venv-saedash`` (torch pinned first, then sae-dashboard 0.8.0), made once."""
    venv, requirements = SAEDASH
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run(pip + [common.TORCH_PIN], check=True)
        subprocess.run(pip + requirements, check=True)
    return python


@torch.no_grad()
def forward_rate(model, rows: torch.Tensor, batch: int = 8) -> float:
    """Tokens/s of the model's forward to the end of block 6 (the limit of harvesting)."""
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        model(rows[i : i + batch], stop_at_layer=7)
    return rows.numel() / (time.perf_counter() - start)


def histogram_gap(edges: list[float], counts: list[int], bar_values: list[float], bar_heights: list[int]) -> float:
    """Largest difference of the cumulative counts (as a fraction of the firing tokens) at
    SAEDashboard's bin edges, beyond what our bins can resolve: at an edge ``x`` our count lies
    between the tokens of the bins that end at or below ``x`` and those of the bins that start
    below it, and only a count outside that range is a disagreement. A feature whose values
    SAEDashboard puts in one point (all bins at the same value) is compared by its total."""
    if not bar_heights or not counts:
        return 0.0
    total = sum(counts)
    step = (bar_values[1] - bar_values[0]) if len(bar_values) > 1 else 0.0
    if step <= 0:
        return abs(sum(bar_heights) - total) / max(total, 1)
    lo = bar_values[0] - step / 2
    gap, running = 0.0, 0
    for i, h in enumerate(bar_heights):
        running += h
        x = lo + (i + 1) * step
        below = sum(c for b, c in zip(edges[1:], counts, strict=True) if b <= x)
        reachable = sum(c for a, c in zip(edges[:-1], counts, strict=True) if a < x)
        gap = max(gap, (below - running) / max(total, 1), (running - reachable) / max(total, 1))
    return gap


def agreement(work: Path, n_tokens: int) -> dict:
    """Top examples, density and histograms of every feature: mechscope's database against SAEDashboard."""
    from mechscope.features import FeatureDB

    theirs = json.loads((work / "saedash.json").read_text())
    db = FeatureDB(work / "features.db")
    from safetensors.torch import load_file

    firsts = [f"first {t}" for t in load_file(str(work / "tokens.safetensors"))["tokens"][:, 0].tolist()]
    same_top, near_ties, value_gap, density_gap, hist_gap = 0, 0, 0.0, 0.0, 0.0
    for f_str, data in theirs["features"].items():
        rec = db.feature(int(f_str))
        mine = [(e.value, e.token_index) for e in rec.top]
        # SAEDashboard's top group is filled up with tokens where the feature is zero; a top
        # example at a row's first position has no value it shows (None), so it is kept, but
        # only among as many entries as SAEDashboard's own density counts firing tokens (beyond
        # that a None is a zero-valued filler at a row's first position); a feature that never
        # fires has no density in its title and only fillers
        them = [(v, b * CONTEXT + p) for v, b, p in data["top"] if v is None or v > 0]
        match = re.search(r"DENSITY = ([0-9.]+)%", data["title"] or "")
        density = float(match.group(1)) / 100 if match else 0.0
        density_gap = max(density_gap, abs(density - rec.fire_count / n_tokens))
        them = them[: round(density * n_tokens)]
        same = [i for _, i in mine] == [i for _, i in them]
        same_top += same

        # a near tie: the lists differ, but at every rank the two values agree within NEAR_TIE
        # (two tokens whose activations differ by less than the tools' float32 disagreement)
        # (their None, at a row's first position, takes our value of the same first token: a
        # row's first activation depends on its first token alone)
        def key(i: int) -> int | str:
            return firsts[i // CONTEXT] if i % CONTEXT == 0 else i

        ours_at = {key(i): v for v, i in mine}
        valued = [(ours_at.get(key(j)) if b is None else b, j) for b, j in them]
        near_ties += (
            not same
            and len(mine) == len(them)
            and all(b is not None and abs(a - b) <= NEAR_TIE for (a, _), (b, _) in zip(mine, valued, strict=True))
        )
        for (a, i), (b, j) in zip(mine, them, strict=False):
            if b is not None and i == j:  # values of the same token (a swapped near-tie is not a value gap)
                value_gap = max(value_gap, abs(a - b))
        hist_gap = max(
            hist_gap, histogram_gap(rec.hist_edges, rec.hist_counts, data["bar_values"], data["bar_heights"])
        )
    mine_np = json.loads((work / "neuronpedia" / "batch-0.json").read_text())
    their_np = json.loads((work / "saedash-batch.json").read_text())
    feature = next((f for f in mine_np["features"] if f["activations"]), mine_np["features"][0])
    their_feature = next((f for f in their_np["features"] if f["activations"]), their_np["features"][0])
    return {
        "features": len(theirs["features"]), "identical_top_positions": same_top,
        "other_near_ties": near_ties, "max_top_value_diff": value_gap,
        "max_density_diff": density_gap, "max_histogram_cdf_gap": hist_gap,
        "neuronpedia_batch_keys_equal": list(mine_np) == list(their_np),
        "neuronpedia_feature_keys_equal": list(feature) == list(their_feature),
        "neuronpedia_activation_keys_equal": (
            list(feature["activations"][0]) == list(their_feature["activations"][0])
            if their_feature["activations"] and feature["activations"]
            else "SAEDashboard wrote no activations"
        ),
    }  # fmt: skip


def agreement_line(agree: dict) -> str:
    """One line: do the two tools see the same activations and pick the same top examples?"""
    return (
        f"agreement: layer-6 residual stream max |diff| {agree['layer6_max_abs_diff']:.3g} on the reference rows; "
        f"identical top-example positions in {agree['identical_top_positions']} of {agree['features']} features "
        f"({agree.get('other_near_ties', '?')} of the others differ only by near ties, values within {NEAR_TIE}); "
        f"top activations max |diff| {agree['max_top_value_diff']:.3g}; density max |diff| "
        f"{agree['max_density_diff']:.3g}; histogram CDF max gap {agree['max_histogram_cdf_gap']:.3g}"
    )


def compare(work: Path, results: dict) -> None:
    """Add SAEDashboard's figures, the ratio and the agreement to ``results``."""
    theirs = json.loads((work / "saedash.json").read_text())
    n = theirs["n_tokens"]
    results["saedash"] = {k: v for k, v in theirs.items() if k != "features"}
    results["saedash"]["tokens_per_s"] = n / theirs["total_s"]
    results["ratio_tokens_per_s"] = results["mechscope"]["tokens_per_s"] / results["saedash"]["tokens_per_s"]
    results["agreement"] = {"layer6_max_abs_diff": theirs["model_max_abs_diff"], **agreement(work, n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=800, help="rows of 128 tokens (800: 102,400 tokens)")
    parser.add_argument("--floor-rows", type=int, default=200, help="rows for the forward-rate floor")
    parser.add_argument("--skip-saedash", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3 under the rules)")
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES)
    parser.add_argument(
        "--features", type=int, default=None, help="SAEDashboard on the first N features only (agreement checks)"
    )
    parser.add_argument("--rescore", default=None, help="a finished run's work folder: recompute the comparison only")
    parser.add_argument("--json", default=str(common.BENCH_DIR / "results" / "features.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.rescore:
        work = Path(args.rescore)
        results = {"mechscope": json.loads((work / "mechscope.json").read_text())}
        compare(work, results)
        print(json.dumps(results, indent=1))
        print(agreement_line(results["agreement"]))
        return
    monitor = common.CpuMonitor()
    model = ms.load("smollm2-135m", device="cpu")
    stream = cached_token_stream(default_corpus_texts(), model.tokenizer, "smollm2")
    rows = stream[: args.rows * CONTEXT].reshape(args.rows, CONTEXT)
    sae = make_sae(SAEConfig(d_in=576, d_sae=2048, architecture="topk", k=32, hook_name=HOOK), seed=0)
    work = Path(tempfile.mkdtemp(prefix="features-bench-"))
    from safetensors.torch import save_file

    save_sae(sae, work / "sae")
    save_file({"tokens": rows.contiguous()}, str(work / "tokens.safetensors"))
    with torch.no_grad():
        _, cache = model.run_with_cache(rows[:2], names_filter=HOOK, stop_at_layer=7)
    save_file({"tokens": rows[:2].contiguous(), "acts": cache[HOOK].contiguous()}, str(work / "reference.safetensors"))

    results: dict = {"n_tokens": int(rows.numel()), "d_sae": 2048, "rounds": args.rounds}
    forward_rate(model, rows[:8])  # the first forward of this shape pays one-off costs
    common.reset_peak_rss()
    base_rss = common.current_rss_mib()
    cfg = HarvestConfig(context_size=CONTEXT, batch_size=8, prepend_bos=False, exclude_bos=False, top_k=20)
    n = rows.numel()
    ours_runs: list[dict] = []

    def ours() -> dict:
        out = work / f"ours-{len(ours_runs)}" if ours_runs else work  # the first round's output is checked
        out.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        result = harvest(model, sae, rows, cfg, progress=False)
        t1 = time.perf_counter()
        db = write_harvest(result, model, out / "features.db")
        t2 = time.perf_counter()
        export_site(db, out / "site", progress=False)
        t3 = time.perf_counter()
        export_neuronpedia(db, out / "neuronpedia", features_per_batch=256)
        t4 = time.perf_counter()
        run = {"harvest_s": t1 - t0, "database_s": t2 - t1, "site_s": t3 - t2, "neuronpedia_s": t4 - t3,
               "total_s": t4 - t0, "db_mib": db.stat().st_size / 2**20}  # fmt: skip
        ours_runs.append(run)
        return {"seconds": run["total_s"]}

    python = None if args.skip_saedash else ensure_saedash_venv()

    def theirs() -> dict:
        cmd = [str(python), str(Path(__file__).with_name("features_worker_saedash.py")), str(work)]
        cmd += [str(args.features)] if args.features else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError("SAEDashboard worker failed:\n" + proc.stderr[-4000:])
        return {"seconds": json.loads((work / "saedash-timings.json").read_text())["total_s"]}

    floor_rows = rows[: args.floor_rows]

    def forward() -> dict:  # the limit of harvesting, timed in the same rounds as the generations
        return {"tokens_per_s": forward_rate(model, floor_rows)}

    jobs = {"mechscope": ours, "forward": forward}
    if not args.skip_saedash:
        jobs["SAEDashboard"] = theirs
    timed = common.interleave(jobs, reps=args.rounds, max_other=args.gate)
    floor = floor_rows.numel() / timed["forward"]["median_s"]

    def median(key: str) -> float:
        return sorted(run[key] for run in ours_runs)[len(ours_runs) // 2]

    results["mechscope"] = {
        **{key: median(key) for key in ours_runs[0]},
        "total_s": timed["mechscope"]["median_s"], "spread": timed["mechscope"]["spread"],
        "tokens_per_s": n / timed["mechscope"]["median_s"], "harvest_tokens_per_s": n / median("harvest_s"),
        "forward_tokens_per_s": floor, "forward_spread": timed["forward"]["spread"],
        "harvest_over_forward": (n / median("harvest_s")) / floor,
        "peak_rss_mib": common.peak_rss_mib(), "base_rss_mib": base_rss,
    }  # fmt: skip
    print(json.dumps(results["mechscope"], indent=1), flush=True)
    (work / "mechscope.json").write_text(json.dumps(results["mechscope"]))
    if not args.skip_saedash:
        compare(work, results)
        them = timed["SAEDashboard"]
        results["saedash"].update(total_s=them["median_s"], spread=them["spread"], tokens_per_s=n / them["median_s"])
        results["ratio_tokens_per_s"] = them["median_s"] / timed["mechscope"]["median_s"]
    results["gate"] = common.gate_note(timed, args.gate)
    other, steal = monitor.other_cores()
    results["other_cores"], results["steal_cores"] = other, steal
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "mechscope"}, indent=1))
    if "agreement" in results:
        print(agreement_line(results["agreement"]))
    print(results["gate"])


if __name__ == "__main__":
    main()

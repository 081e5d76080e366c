"""Forward-pass benchmark: mechscope against plain transformers and TransformerLens.

What it measures, on the bundled SmolLM2-135M (fp32, CPU, torch.set_num_threads(2)),
for one batch of random token ids (default 8 x 128, fixed seed, the same tokens
for every contender), all under torch.inference_mode():

  * time of ``model(tokens)`` for plain ``transformers`` (AutoModelForCausalLM
    loaded from a local HF copy of the bundled GGUF), mechscope, and
    TransformerLens (classic HookedTransformer from transformer-lens 3.x,
    without weight processing, and TransformerBridge from transformer-lens 4.x);
  * time of ``run_with_cache(tokens)`` caching every hook (no names_filter) for
    mechscope and both TransformerLens models;
  * median, min and spread of --runs runs after one warm-up; transformers and
    mechscope run in this process, each TransformerLens line in a worker under
    its own venv that stays loaded, and every (contender, workload) runs once
    per round, round after round (``common.interleave``); a run during which
    other processes took more than --gate cores (default 0.25) is retaken;
  * peak memory of each workload, each in its own fresh subprocess: load the
    model, run the workload once as a warm-up (memory-mapped weights become
    resident only when first used), collect garbage and trim the freed heap,
    read the RSS (the resident model), reset the peak-RSS counter (VmHWM) and
    run the workload again; reported are that run's peak RSS and its increase
    over the RSS before it;
  * the largest absolute difference between the contenders' logits;
  * the CPU that other processes took while timing (the machine has 2 cores:
    anything else running distorts the times).

The local HF directory is made once under benchmarks/.cache/smollm2-hf; the
TransformerLens venvs are made once under benchmarks/.venv-tl (sae-lens 6.54.12,
which pins transformer-lens 3.9) and benchmarks/.venv-tl4 (transformer-lens
4.3.0), torch 2.13.0 (CPU) installed first. Everything runs offline.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/forward.py [--runs 5] [--batch 8] [--seq 128] [--gate 0.25]
                                           [--skip-tl] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import forward_worker as fw  # sets the offline environment and 2 torch threads
import torch

WORKER = Path(fw.__file__).resolve()

# TransformerLens contenders; each runs under the peer venv of the same name (common.PEER_VENVS).
PEERS = ("tl3", "tl4")
LABELS = {
    "hf": "transformers",
    "ms": "mechscope",
    "tl3": "TL 3.9 HookedTransformer",
    "tl4": "TL 4.3 TransformerBridge",
}
WORKLOAD_LABELS = {"forward": "forward", "cache": "run_with_cache (all hooks)"}

TARGET_FORWARD = 1.05
TARGET_CACHE_TIME = 0.5
TARGET_CACHE_MEM = 0.5


class WorkerError(RuntimeError):
    pass


def run_worker(python: Path, args: list[str], out: Path) -> dict:
    proc = subprocess.run(
        [str(python), str(WORKER), *args, "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise WorkerError("\n".join(tail))
    return json.loads(out.read_text())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def verdict(value, target) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}  (target <= {target:.2f}: {'met' if value <= target else 'MISSED'})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs after one warm-up, interleaved (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default 0)")
    parser.add_argument(
        "--gate", type=float, default=common.MAX_OTHER_CORES, help="retake samples while others take more cores"
    )
    parser.add_argument("--skip-tl", action="store_true", help="skip the TransformerLens peers")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    print(
        f"mechscope forward benchmark  {datetime.date.today()}  "
        f"python {platform.python_version()}  torch {torch.__version__}  "
        f"threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
        f"loadavg {os.getloadavg()[0]:.2f}"
    )
    print(
        f"workload: SmolLM2-135M fp32, batch {args.batch} x {args.seq} random token ids "
        f"(seed {args.seed}), median/min of {args.runs} runs after 1 warm-up, inference_mode"
    )

    common.ensure_hf_dir()
    peers: dict[str, Path] = {}
    problems: list[str] = []
    if not args.skip_tl:
        for name in PEERS:
            try:
                peers[name] = common.ensure_peer_venv(name)
            except RuntimeError as exc:
                problems.append(f"{LABELS[name]}: venv install failed:\n{exc}")

    results: dict = {
        "date": str(datetime.date.today()),
        "args": vars(args),
        "timings": {},
        "memory": {},
        "load_s": {},
        "versions": {},
        "logits_max_abs_diff": {},
    }

    with tempfile.TemporaryDirectory(prefix="mechscope-bench-") as tmp_name:
        tmp = Path(tmp_name)
        vocab = json.loads((common.HF_DIR / "config.json").read_text())["vocab_size"]
        generator = torch.Generator().manual_seed(args.seed)
        tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=generator)
        tokens_path = tmp / "tokens.pt"
        torch.save(tokens, tokens_path)

        # Every contender loaded once (transformers and mechscope here, each TransformerLens line
        # in a worker under its venv), then every (contender, workload) timed, interleaved.
        jobs, workers, logits = {}, {}, {}
        for name in ("hf", "ms"):
            contender, load_s = fw.load_contender(name)
            results["load_s"][name] = load_s
            results["versions"][name] = contender.versions()
            cache = fw.warm_up(contender, tokens)
            if cache:
                results["timings"].setdefault(name, {})["cache_stats"] = cache
            logits[name] = fw.forward_logits(contender, tokens)
            for workload in fw.WORKLOADS_OF[name]:
                jobs[(name, workload)] = lambda c=contender, w=workload: fw.timed_workload(c, w, tokens)
        for name, python in peers.items():
            try:
                worker = common.Worker(
                    python,
                    [str(WORKER), "serve", "--contenders", name, "--tokens", str(tokens_path)],
                    tmp / f"{name}.log",
                )
                info = worker.request({"op": "info"})
                worker.request({"op": "logits", "contender": name, "path": str(tmp / f"{name}.pt")})
            except RuntimeError as exc:
                problems.append(f"{LABELS[name]} worker failed:\n{exc}")
                continue
            workers[name] = worker
            results["load_s"].update(info["load_s"])
            results["versions"].update(info["versions"])
            results["timings"].setdefault(name, {})["cache_stats"] = info["cache"][name]
            logits[name] = torch.load(tmp / f"{name}.pt", weights_only=True)
            for workload in fw.WORKLOADS_OF[name]:
                jobs[(name, workload)] = lambda wk=worker, n=name, w=workload: wk.request(
                    {"op": "run", "contender": n, "workload": w}
                )
        timed = common.interleave({f"{n} {w}": fn for (n, w), fn in jobs.items()}, reps=args.runs, max_other=args.gate)
        for worker in workers.values():
            worker.close()
        for name, workload in jobs:
            stats = timed[f"{name} {workload}"]
            stats.pop("last")
            results["timings"].setdefault(name, {})[workload] = stats
        for name in results["timings"]:
            cache = results["timings"][name].pop("cache_stats", None)
            if cache and "cache" in results["timings"][name]:
                results["timings"][name]["cache"]["cache"] = cache
        results["gate"] = common.gate_note(timed, args.gate)
        fw.release_memory()

        # Peak memory: every (contender, workload) in a fresh subprocess.
        pythons = {"hf": Path(sys.executable), "ms": Path(sys.executable), **peers}
        for name, python in pythons.items():
            for workload in fw.WORKLOADS_OF[name]:
                if name in peers and name not in results["timings"]:
                    continue
                try:
                    mem = run_worker(
                        python,
                        ["mem", "--contender", name, "--workload", workload, "--tokens", str(tokens_path)],
                        tmp / f"mem-{name}-{workload}.json",
                    )
                except WorkerError as exc:
                    problems.append(f"{LABELS[name]} {workload} memory run failed:\n{exc}")
                    continue
                results["memory"].setdefault(name, {})[workload] = mem

    names = [n for n in LABELS if n in results["timings"]]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if a in logits and b in logits:
                results["logits_max_abs_diff"][f"{a} vs {b}"] = max_abs_diff(logits[a], logits[b])

    results["ratios"] = compute_ratios(results)
    results["problems"] = problems
    print_report(results, names, problems)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nresults written to {args.json}")
    return 0


def _get(table: dict, name: str, workload: str, key: str):
    return table.get(name, {}).get(workload, {}).get(key)


def compute_ratios(results: dict) -> dict:
    """mechscope over each reference: forward time against transformers and the
    peers, run_with_cache time, peak RSS and RSS increase against the peers."""
    timings, memory = results["timings"], results["memory"]
    ratios = {
        "ms_forward_over_hf_forward_median": ratio(
            _get(timings, "ms", "forward", "median_s"), _get(timings, "hf", "forward", "median_s")
        ),
        "ms_forward_over_hf_forward_min": ratio(
            _get(timings, "ms", "forward", "min_s"), _get(timings, "hf", "forward", "min_s")
        ),
    }
    for peer in PEERS:
        if peer not in timings:
            continue
        ratios[f"ms_cache_over_{peer}_cache_time_median"] = ratio(
            _get(timings, "ms", "cache", "median_s"), _get(timings, peer, "cache", "median_s")
        )
        ratios[f"ms_cache_over_{peer}_cache_peak_rss"] = ratio(
            _get(memory, "ms", "cache", "peak_mib"), _get(memory, peer, "cache", "peak_mib")
        )
        ratios[f"ms_cache_over_{peer}_cache_rss_increase"] = ratio(
            _get(memory, "ms", "cache", "increase_mib"), _get(memory, peer, "cache", "increase_mib")
        )
        ratios[f"ms_forward_over_{peer}_forward_median"] = ratio(
            _get(timings, "ms", "forward", "median_s"), _get(timings, peer, "forward", "median_s")
        )
    return ratios


def print_report(results: dict, names: list[str], problems: list[str]) -> None:
    timings, memory, ratios = results["timings"], results["memory"], results["ratios"]

    print()
    header = (
        f"{'contender':<26} {'workload':<27} {'median s':>9} {'spread':>7} "
        f"{'peak RSS MiB':>13} {'+ over model':>12} {'cached':>16}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        for workload in fw.WORKLOADS:
            if workload not in timings[name]:
                continue
            cache = timings[name][workload].get("cache")
            cached = f"{cache['entries']} / {cache['mib']:.0f} MiB" if cache else ""
            print(
                f"{LABELS[name]:<26} {WORKLOAD_LABELS[workload]:<27} "
                f"{fmt(_get(timings, name, workload, 'median_s'), '9.3f'):>9} "
                f"{fmt(100 * _get(timings, name, workload, 'spread'), '6.0f')}% "
                f"{fmt(_get(memory, name, workload, 'peak_mib'), '13.0f'):>13} "
                f"{fmt(_get(memory, name, workload, 'increase_mib'), '+12.0f'):>12} "
                f"{cached:>16}"
            )
    print("\nload time (s): " + ", ".join(f"{LABELS[n]} {results['load_s'][n]:.1f}" for n in names))
    loaded = [n for n in names if "forward" in memory.get(n, {})]
    print(
        "RSS right after load / after a warm-up forward (MiB): "
        + ", ".join(
            f"{LABELS[n]} {memory[n]['forward']['rss_after_load_mib']:.0f} / "
            f"{memory[n]['forward']['rss_before_run_mib']:.0f}"
            for n in loaded
        )
    )

    print("\nlogits agreement (max abs diff):")
    for pair, diff in results["logits_max_abs_diff"].items():
        a, b = pair.split(" vs ")
        print(f"  {LABELS[a]:<26} vs {LABELS[b]:<26} {diff:.2e}")

    print("\nratios:")
    print(
        "  mechscope forward / transformers forward, median: "
        + verdict(ratios["ms_forward_over_hf_forward_median"], TARGET_FORWARD)
    )
    print(
        "  mechscope forward / transformers forward, min:    "
        + verdict(ratios["ms_forward_over_hf_forward_min"], TARGET_FORWARD)
    )
    for peer in PEERS:
        if peer not in timings:
            continue
        print(f"  mechscope run_with_cache / {LABELS[peer]} run_with_cache")
        print("    time (median):  " + verdict(ratios[f"ms_cache_over_{peer}_cache_time_median"], TARGET_CACHE_TIME))
        print("    peak RSS:       " + verdict(ratios[f"ms_cache_over_{peer}_cache_peak_rss"], TARGET_CACHE_MEM))
        print("    RSS increase:   " + verdict(ratios[f"ms_cache_over_{peer}_cache_rss_increase"], TARGET_CACHE_MEM))
        print(
            f"  mechscope forward / {LABELS[peer]} forward (median): "
            + fmt(ratios[f"ms_forward_over_{peer}_forward_median"], ".2f")
        )

    print("\n" + results["gate"])
    print(
        "\nversions: "
        + "; ".join(f"{LABELS[n]}: " + ", ".join(f"{k} {v}" for k, v in results["versions"][n].items()) for n in names)
    )
    if problems:
        print("\nproblems:")
        for problem in problems:
            print("  " + problem.replace("\n", "\n    "))


if __name__ == "__main__":
    sys.exit(main())

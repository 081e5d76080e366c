"""Circuit discovery benchmark (mechscope.circuits) on the bundled SmolLM2-135M.

On IOI prompts (``ioi_dataset(model, n=--prompts, seed=0)``, template 0, third-name corruption,
15 tokens), metric the mean logit difference (indirect object minus subject), noising:

  * EAP over every edge (70,651) against one plain forward and backward of the same batch
    (parameters requiring gradients, as in training; and with only the input requiring one);
  * EAP-IG, 5 steps, inputs variant (and with ``--ig-activations`` the activations variant), against EAP;
  * ACDC (KL divergence to the clean run, threshold ``--threshold``) on the receivers
    ``--reference-receivers`` against a reference ACDC implemented in
    ``benchmarks/circuits_reference.py`` (one edge per full forward with plain hooks, the same
    greedy rules and threshold; the kept edges must be equal), and against mechscope's own ACDC
    with one edge per forward (``window=1``); with ``--acdc-full-graph``, mechscope's ACDC on the
    whole graph;
  * peak memory (RSS high-water mark above the RSS after loading, in a fresh process each) of
    EAP against a plain forward and backward at 8 x 128 tokens (random tokens; the corrupted
    copy changes every fourth position);
  * auto-circuit's EAP (in ``benchmarks/.venv-autocircuit``, see ``circuits_autocircuit.py``) on
    the same model weights and prompts: time, and Spearman correlation of the edge scores;
  * the CPU other processes took while timing (the machine has 2 cores).

The attribution timings are interleaved run by run (``common.interleave``: ``--repeats`` samples
of each, a sample during which other processes took more than 0.25 cores retaken; median and
spread reported); so are the three ACDC contenders (``--acdc-rounds`` rounds); the whole-graph
ACDC run is a single run, with the load printed.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/circuits.py [--prompts 8] [--repeats 3] [--threshold 0.02]
        [--reference-receivers logits,m29,m15] [--acdc-full-graph] [--skip-attribution] [--skip-acdc]
        [--skip-memory] [--skip-autocircuit] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)


def _load():
    import mechscope as ms
    from mechscope.data.tasks import ioi_dataset

    model = ms.load("smollm2-135m")
    return model, ioi_dataset


def _plain(model, tokens, metric, params: bool) -> None:
    """One forward and backward of ``sum(metric)``: parameter gradients, or the embedding's only."""
    from mechscope.circuits.attribution import frozen_parameters

    if params:
        metric(model(tokens)).sum().backward()
        model.zero_grad(set_to_none=True)
        return
    leaf = {}

    def make_leaf(x, *, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    with frozen_parameters(model):
        metric(model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", make_leaf)])).sum().backward()


def time_attribution(model, data, repeats: int, activations: bool) -> dict:
    from mechscope.circuits import edge_scores

    metric = data.metric()
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    runs = {
        "plain forward+backward (parameter gradients)": lambda: _plain(model, clean, metric, True),
        "plain forward+backward (input gradient only)": lambda: _plain(model, clean, metric, False),
        "EAP": lambda: edge_scores(model, clean, corrupted, metric, method="eap"),
        "EAP-IG inputs, 5 steps": lambda: edge_scores(model, clean, corrupted, metric, method="eap-ig-inputs"),
    }
    for name, fn in runs.items():  # warm-up (EAP-IG shares EAP's code paths)
        if not name.startswith("EAP-IG"):
            fn()
    if activations:
        runs["EAP-IG activations, 5 steps"] = lambda: edge_scores(
            model, clean, corrupted, metric, method="eap-ig-activations"
        )
    timed = common.interleave(runs, reps=repeats)
    return {
        "seconds": {name: t["median_s"] for name, t in timed.items()},
        "spread": {name: t["spread"] for name, t in timed.items()},
        "all_seconds": {name: t["samples_s"] for name, t in timed.items()},
        "other_cores": max(max(t["other_cores"]) for t in timed.values()),
        "gate": common.gate_note(timed),
    }


def time_acdc(model, data, threshold: float, receivers: list[str], full_graph: bool, rounds: int) -> dict:
    import circuits_reference

    from mechscope.circuits import acdc

    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    runs = {}

    def job(name, fn):
        def run() -> None:
            runs[name] = fn()

        return run

    timed = common.interleave(
        {
            "mechscope": job(
                "mechscope", lambda: acdc(model, clean, corrupted, threshold=threshold, receivers=receivers)
            ),
            "mechscope window=1": job(
                "window1", lambda: acdc(model, clean, corrupted, threshold=threshold, receivers=receivers, window=1)
            ),
            "reference": job(
                "reference", lambda: circuits_reference.reference_acdc(model, clean, corrupted, threshold, receivers)
            ),
        },
        reps=rounds,
    )
    ours, one_per_forward, reference = runs["mechscope"], runs["window1"], runs["reference"]
    full, full_s = None, None
    if full_graph:
        monitor = common.CpuMonitor()
        start = time.perf_counter()
        full = acdc(model, clean, corrupted, threshold=threshold)
        full_s = time.perf_counter() - start
        full_other, _ = monitor.other_cores()
    out = {
        "receivers": receivers,
        "threshold": threshold,
        "rounds": rounds,
        "ours_seconds": timed["mechscope"]["median_s"],
        "ours_spread": timed["mechscope"]["spread"],
        "ours_batches": ours.settings["batches"],
        "ours_evaluations": ours.settings["evaluations"],
        "window1_seconds": timed["mechscope window=1"]["median_s"],
        "window1_spread": timed["mechscope window=1"]["spread"],
        "window1_batches": one_per_forward.settings["batches"],
        "reference_seconds": timed["reference"]["median_s"],
        "reference_spread": timed["reference"]["spread"],
        "reference_forwards": reference["forwards"],
        "same_edges_as_reference": sorted(ours.edge_names) == reference["edges"],
        "same_edges_window1": ours.edge_names == one_per_forward.edge_names,
        "edges_kept_subset": ours.n_edges,
        "edges_subset": int(sum(r in receivers for r in (n.split("->")[1] for n in ours.graph.edge_names))),
        "gate": common.gate_note(timed),
    }
    if full is not None:
        out.update(
            full_seconds=full_s,
            full_edges_kept=full.n_edges,
            full_batches=full.settings["batches"],
            full_evaluations=full.settings["evaluations"],
            full_metric=full.settings["metric_circuit"],
            full_other_cores=full_other,
        )
    return out


def memory_worker(kind: str) -> None:
    """In a fresh process: peak RSS above the post-load RSS of one run at 8 x 128 tokens."""
    from mechscope.circuits import edge_scores
    from mechscope.patching.metrics import LogitDiff

    model, _ = _load()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(model.cfg.d_vocab, (8, 128), generator=gen)
    corrupted = clean.clone()
    corrupted[:, ::4] = torch.randint(model.cfg.d_vocab, corrupted[:, ::4].shape, generator=gen)
    metric = LogitDiff(torch.randint(model.cfg.d_vocab, (8,), generator=gen),
                       torch.randint(model.cfg.d_vocab, (8,), generator=gen))  # fmt: skip
    before = common.current_rss_mib()
    common.reset_peak_rss()
    start = time.perf_counter()
    if kind == "eap":
        edge_scores(model, clean, corrupted, metric, method="eap")
    else:
        _plain(model, clean, metric, kind == "plain")
    seconds = time.perf_counter() - start
    print(json.dumps({"kind": kind, "peak_above_load_mib": common.peak_rss_mib() - before, "seconds": seconds}))


def memory(kinds=("plain", "plain_inputs", "eap")) -> dict:
    out = {}
    for kind in kinds:
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", kind], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-2000:])
        out[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def autocircuit(model, data, repeats: int) -> dict:
    """auto-circuit's EAP in its own venv (see circuits_autocircuit.py) against mechscope's: time
    and Spearman correlations of the scores of the edges both graphs share."""
    import tempfile

    from scipy.stats import spearmanr

    from mechscope.circuits import Graph, edge_scores

    python = common.venv_python(common.BENCH_DIR / ".venv-autocircuit")
    if not python.exists():
        return {"error": "benchmarks/.venv-autocircuit is missing (see circuits_autocircuit.py for how it is made)"}
    common.ensure_hf_dir()
    with tempfile.TemporaryDirectory() as tmp:
        data_path, out_path = Path(tmp) / "data.pt", Path(tmp) / "out.json"
        torch.save({"clean": data.clean_tokens, "corrupted": data.corrupted_tokens, "correct": data.correct,
                    "wrong": data.wrong, "repeats": repeats}, data_path)  # fmt: skip
        proc = subprocess.run([str(python), str(Path(__file__).with_name("circuits_autocircuit.py")), str(data_path),
                               str(out_path)], capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"}
        theirs = json.loads(out_path.read_text())
    graph = Graph.of(model)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ours = edge_scores(model, data.clean_tokens, data.corrupted_tokens, data.metric())
        times.append(time.perf_counter() - start)
    shared = [name for name in theirs["edges"] if name in set(graph.edge_names)]
    a = torch.tensor([float(ours[graph.edge_index(name)]) for name in shared])
    b = torch.tensor([theirs["edges"][name] for name in shared])
    return {
        "edges_compared": len(shared),
        "autocircuit_edges": len(theirs["edges"]),
        "spearman_signed": float(spearmanr(a, b).statistic),
        "spearman_abs": float(spearmanr(a.abs(), b.abs()).statistic),
        "autocircuit_seconds": statistics.median(theirs["seconds"]),
        "autocircuit_wrap_seconds": theirs["wrap_seconds"],
        "mechscope_seconds": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument("--reference-receivers", default="logits,m29,m15")
    parser.add_argument("--skip-attribution", action="store_true")
    parser.add_argument("--ig-activations", action="store_true", help="also time EAP-IG over activations")
    parser.add_argument("--skip-acdc", action="store_true")
    parser.add_argument("--acdc-full-graph", action="store_true", help="also time ACDC on every receiver (one run)")
    parser.add_argument("--acdc-rounds", type=int, default=3, help="interleaved rounds of the ACDC contenders")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-autocircuit", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return
    model, ioi_dataset = _load()
    data = ioi_dataset(model, n=args.prompts, seed=0)
    results = {"prompts": args.prompts, "tokens": data.clean_tokens.shape[1]}
    if not args.skip_attribution:
        results["attribution"] = att = time_attribution(model, data, args.repeats, args.ig_activations)
        base = att["seconds"]["plain forward+backward (parameter gradients)"]
        for name, seconds in att["seconds"].items():
            print(f"{name:48s} {seconds:7.2f} s ±{50 * att['spread'][name]:.0f}%  ({seconds / base:.2f}x plain)")
        eap = att["seconds"]["EAP"]
        print(f"EAP-IG inputs / EAP: {att['seconds']['EAP-IG inputs, 5 steps'] / eap:.2f}x; {att['gate']}")
    if not args.skip_acdc:
        receivers = [r for r in args.reference_receivers.split(",") if r]
        results["acdc"] = a = time_acdc(model, data, args.threshold, receivers, args.acdc_full_graph, args.acdc_rounds)
        print(f"ACDC on {receivers} ({a['edges_subset']} edges, {a['rounds']} interleaved rounds, median, spread): "
              f"{a['ours_seconds']:.1f} s ({a['ours_spread']:.2f}; {a['ours_batches']} batches), window=1 "
              f"{a['window1_seconds']:.1f} s ({a['window1_spread']:.2f}), reference {a['reference_seconds']:.1f} s "
              f"({a['reference_spread']:.2f}; {a['reference_forwards']} forwards): "
              f"{a['reference_seconds'] / a['ours_seconds']:.1f}x; "
              f"same edges: {a['same_edges_as_reference']}")  # fmt: skip
        if "full_seconds" in a:
            print(f"ACDC on the whole graph (one run): {a['full_seconds']:.1f} s, {a['full_edges_kept']} edges kept, "
                  f"{a['full_batches']} batches; other processes used {a['full_other_cores']:.2f} cores")  # fmt: skip
        print(a["gate"])
    if not args.skip_memory:
        results["memory"] = mem = memory()
        for kind, row in mem.items():
            print(f"memory 8x128 {kind:13s} peak +{row['peak_above_load_mib']:.0f} MiB, {row['seconds']:.1f} s")
    if not args.skip_autocircuit:
        results["autocircuit"] = ac = autocircuit(model, data, args.repeats)
        if "error" in ac:
            print(f"auto-circuit: {ac['error']}")
        else:
            print(f"auto-circuit EAP {ac['autocircuit_seconds']:.2f} s, mechscope {ac['mechscope_seconds']:.2f} s; "
                  f"Spearman over {ac['edges_compared']} edges: signed {ac['spearman_signed']:.4f}, "
                  f"|score| {ac['spearman_abs']:.4f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

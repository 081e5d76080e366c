"""``mechscope circuit``: find a circuit for a task, write it with its faithfulness curve and its graph.

``mechscope circuit --task ioi --method eap-ig --edges 200 --out DIR`` loads the model, builds the
task's clean and corrupted prompts, scores every edge (or runs ACDC), keeps the circuit and
writes ``DIR/circuit.json`` (schema in `mechscope.circuits.circuit`), ``DIR/faithfulness.json``
and ``.png``, and the graph as ``DIR/graph.html`` (self-contained), ``.svg``, ``.dot`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

METHODS = {"eap": "eap", "eap-ig": "eap-ig-inputs", "eap-ig-inputs": "eap-ig-inputs",
           "eap-ig-activations": "eap-ig-activations", "acdc": "acdc"}  # fmt: skip
TASKS = ("ioi", "greater-than")


def add_circuit_parser(sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter):
    """Register ``mechscope circuit`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_circuit_parser(parser.add_subparsers())
        >>> args = parser.parse_args(["circuit", "--task", "ioi", "--method", "eap-ig", "--edges", "200"])
        >>> args.func.__name__, args.edges, args.sizes
        ('circuit', 200, '50,100,200,500')
    """
    p = sub.add_parser(
        "circuit",
        help="find a circuit (EAP, EAP-IG or ACDC) for IOI or greater-than and write it with its faithfulness",
        description="Score every edge of the model's graph on a task (EAP, EAP-IG) or prune it (ACDC), keep the "
        "circuit, and write it as JSON with its faithfulness curve and graph (HTML, SVG, .dot, PNG).",
        formatter_class=formatter_class,
    )
    p.add_argument("--task", choices=TASKS, default="ioi", help="the task's clean/corrupted prompts")
    p.add_argument("--method", choices=list(METHODS), default="eap-ig", help="eap-ig means eap-ig-inputs")
    p.add_argument("--edges", type=int, default=200, help="edges kept (attribution methods)")
    p.add_argument("--threshold", type=float, default=0.05, help="ACDC's threshold on the damage")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG steps")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory, .gguf file or hub id")
    p.add_argument("--n-prompts", type=int, default=8, help="prompt pairs")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    p.add_argument("--metric", choices=("auto", "logit_diff", "prob_diff", "kl"), default="auto",
                   help="auto: logit_diff for ioi, prob_diff for greater-than (ACDC: kl)")  # fmt: skip
    p.add_argument("--direction", choices=("noising", "denoising"), default="noising", help="which run is patched")
    p.add_argument("--ablation", choices=("patch", "mean", "zero"), default="patch",
                   help="what removed edges carry: the corrupted run, its mean, or zero")  # fmt: skip
    p.add_argument("--sizes", default="50,100,200,500", help="edge counts of the faithfulness curve")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda (None: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's default)")
    p.add_argument("--out", default="mechscope-circuit", help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=circuit)


def _task(model, args):
    from mechscope.data import tasks
    from mechscope.patching.metrics import KLDivergence

    if args.task == "ioi":
        data = tasks.ioi_dataset(model, n=args.n_prompts, seed=args.seed)
    else:
        data = tasks.greater_than_dataset(model, n=args.n_prompts, seed=args.seed)
    data = data.to(model.device)
    kind = args.metric
    if kind == "auto":
        kind = "kl" if args.method == "acdc" else ("logit_diff" if args.task == "ioi" else "prob_diff")
    task_metric = data.metric("logit_diff" if args.task == "ioi" else "prob_diff")
    if kind == "kl":
        import torch

        with torch.no_grad():
            clean_logits = model(data.clean_tokens, attention_mask=data.attention_mask)
        return data, KLDivergence(clean_logits), task_metric, kind
    return data, data.metric(kind), task_metric, kind


def circuit(args: argparse.Namespace) -> int:
    import torch

    import mechscope as ms
    from mechscope.circuits import acdc, attribute, faithfulness_curve
    from mechscope.circuits.render import save_circuit_html, save_circuit_png, to_dot, to_svg
    from mechscope.errors import InputError
    from mechscope.viz import save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes takes comma-separated edge counts, e.g. 50,100,200; got {args.sizes!r}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = ms.load(args.model, device=device)
    data, metric, task_metric, metric_kind = _task(model, args)
    print(f"{args.model}: {args.task}, {len(data)} prompt pairs of {data.clean_tokens.shape[1]} tokens "
          f"(loaded in {time.perf_counter() - start:.0f}s)")  # fmt: skip
    method = METHODS[args.method]
    common = dict(attention_mask=data.attention_mask, direction=args.direction, ablation=args.ablation)
    start = time.perf_counter()
    if method == "acdc":
        found = acdc(model, data.clean_tokens, data.corrupted_tokens, threshold=args.threshold, metric=metric,
                     progress=not args.quiet, **common)  # fmt: skip
        scored = found
    else:
        scored = attribute(model, data.clean_tokens, data.corrupted_tokens, metric, method=method, steps=args.steps,
                           progress=not args.quiet, **common)  # fmt: skip
        found = scored.top(args.edges)
    seconds = time.perf_counter() - start
    found.settings.update(task=args.task, metric=metric_kind, n_prompts=len(data), seconds=round(seconds, 2))
    print(f"{method}: {found.n_edges} of {found.graph.n_edges} edges in {seconds:.1f}s")
    curve = faithfulness_curve(model, scored, data.clean_tokens, data.corrupted_tokens, task_metric, sizes=sizes,
                               ablation=args.ablation, attention_mask=data.attention_mask,
                               progress=not args.quiet)  # fmt: skip
    found.save(out / "circuit.json")
    (out / "faithfulness.json").write_text(json.dumps(curve.to_dict(), indent=2))
    png = save_png(curve.figure(), out / "faithfulness.png")
    save_circuit_html(found, out / "graph.html", title=f"{args.task} circuit ({method}, {found.n_edges} edges)")
    (out / "graph.svg").write_text(to_svg(found))
    (out / "graph.dot").write_text(to_dot(found))
    save_circuit_png(found, out / "graph.png")
    for k, f, c in zip(curve.sizes, curve.faithfulness, curve.completeness, strict=True):
        print(f"  {k:>5} edges: faithfulness {f:.3f}, with them removed {c:.3f}")
    print(f"wrote {out / 'circuit.json'}, {out / 'faithfulness.json'}{', ' + str(png) if png else ''}, "
          f"{out / 'graph.html'} (.svg, .dot, .png)")  # fmt: skip
    return 0

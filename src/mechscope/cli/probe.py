"""``mechscope probe``: dense and k-sparse probes of a labelled token dataset at every layer, as a report.

The dataset is one of `mechscope.probing.datasets.DATASETS` (built offline from the default
corpus) or the researcher's own JSON-lines file (``--data``, read by
`mechscope.probing.datasets.load_dataset_file`); the hook is a short name (``post``: MLP
neurons, ``resid_post``: the residual stream) taken at each chosen layer. The report is printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _probe(args: argparse.Namespace) -> int:
    import torch

    import mechscope as ms
    from mechscope.probing import ProbeConfig
    from mechscope.probing.datasets import build_dataset, load_dataset_file
    from mechscope.probing.study import probing_study

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = ms.load(args.model, device=args.device)
    if args.data is not None:
        dataset = load_dataset_file(args.data, model.tokenizer, args.seq_len)
    else:
        dataset = build_dataset(args.dataset, model.tokenizer, args.sequences, args.seq_len, args.seed)
    layers = args.layers if args.layers else list(range(0, model.cfg.n_layers, args.layer_step))
    report = probing_study(model, dataset, args.site, layers, ks=args.ks, exact_k=args.exact_k, method=args.method,
                           per_sequence=args.per_sequence, cfg=ProbeConfig(l2=args.l2), seed=args.seed,
                           progress=not args.quiet)  # fmt: skip
    report["wall_seconds"] = time.perf_counter() - start
    print(
        f"{dataset.name}: {dataset.description}; {report['n_train']} train / {report['n_test']} test positions "
        f"(split by sequence), positive rate {report['positive_rate']:.3f}; site {args.site}, ranking {args.method}"
    )
    ks = [s["k"] for s in report["layers"][0]["sparse"]]
    shown = 4 if 4 in ks else ks[-1]
    header = " ".join(f"{'k=' + str(k):>7}" for k in ks)
    print(f"{'layer':>5} {'dense F1':>9} {header}   top neurons (k={shown})")
    for row in report["layers"]:
        top = next(s["features"] for s in row["sparse"] if s["k"] == shown)
        print(f"{row['layer']:>5} {row['dense']['f1']:>9.3f} " + " ".join(f"{s['f1']:>7.3f}" for s in row["sparse"])
              + f"   {top}")  # fmt: skip
        for e in row["exact"]:
            print(f"{'':>5} exact k={e['k']}: F1 {e['f1']:.3f} with {e['features']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"F1 on held-out sequences; report in {out} ({report['wall_seconds']:.0f} s)")
    return 0


def add_probe_parser(
    sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
) -> None:
    """Register ``mechscope probe`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_probe_parser(parser.add_subparsers())
        >>> args = parser.parse_args(["probe", "--dataset", "code_block", "--ks", "1", "2"])
        >>> args.dataset, args.ks
        ('code_block', [1, 2])
    """
    p = sub.add_parser("probe", help="dense and k-sparse probes of a labelled token dataset at every layer",
                       description="Fit dense and k-sparse logistic probes (Gurnee et al. 2023) of a labelled "
                       "dataset (built offline from the default corpus, or your own file), layer by layer, "
                       "split by sequence.",
                       formatter_class=formatter_class)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory, .gguf file or hub id")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--dataset",
        default="prose_vs_code",
        choices=["prose_vs_code", "code_block", "capitalized"],
        help="a labelled dataset built from the default corpus",
    )
    source.add_argument("--data", default=None, metavar="FILE.jsonl",
                        help='your own labelled texts, one JSON object per line: {"text": ..., "label": 0 or 1} '
                        'or {"text": ..., "spans": [[start, end], ...]} (character ranges labelled 1); each text '
                        "keeps its first SEQ_LEN tokens (default: none; --dataset is used)")  # fmt: skip
    p.add_argument("--site", default="post", help="short hook name at each layer (post: MLP neurons, resid_post)")
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to probe (default: every LAYER_STEP)")
    p.add_argument("--layer-step", type=int, default=3, help="probe every this many layers when --layers is absent")
    p.add_argument("--sequences", type=int, default=256, help="token windows in a built dataset")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (per text with --data)")
    p.add_argument("--per-sequence", type=int, default=32, help="labelled positions kept per window")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="sizes of the sparse probes")
    p.add_argument("--exact-k", type=int, nargs="*", default=[], help="k values (<= 3) for the exact search")
    p.add_argument("--method", default="f_statistic", choices=["mean_difference", "f_statistic", "l1"],
                   help="how neurons are ranked")  # fmt: skip
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the probes")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows, positions and split")
    p.add_argument("--device", default=None, help="e.g. cpu or cuda (None: the loader's default)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="probe-report.json", help="where the JSON report is written")
    p.set_defaults(func=_probe)

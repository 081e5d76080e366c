"""The ``mechscope`` command line. ``mechscope tour`` is the README's main job."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence

import torch

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cache_summary(cache) -> list[str]:
    """One line per hook kind: its name pattern, shape, how many layers, and bytes in total."""
    groups: dict[str, list] = {}
    for name, tensor in cache.items():
        pattern = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
        groups.setdefault(pattern, []).append(tensor)
    width = max(len(p) for p in groups)
    lines = [f"{'hook':<{width}}  {'shape':<22} {'layers':>6} {'bytes':>10}"]
    for pattern, tensors in groups.items():
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        shape = str(list(tensors[0].shape))
        count = str(len(tensors)) if pattern.startswith("blocks.") else "-"
        lines.append(f"{pattern:<{width}}  {shape:<22} {count:>6} {_format_bytes(nbytes):>10}")
    return lines


def tour(args: argparse.Namespace) -> int:
    """Load the model, show its next-token predictions for a prompt, and summarise a full cache."""
    import mechscope as ms

    torch.manual_seed(0)
    start = time.perf_counter()
    model = ms.load(args.model, device=args.device)
    cfg = model.cfg
    print(f"== mechscope tour: {cfg.model_name} ==")
    print(
        f"loaded in {time.perf_counter() - start:.1f}s: {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads ({cfg.n_key_value_heads} key/value heads), d_mlp {cfg.d_mlp}, "
        f"vocab {cfg.d_vocab}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{len(model.hook_dict)} hook points"
    )
    tokens = model.to_tokens(args.prompt)
    print(f"\nprompt: {args.prompt!r}")
    print(f"tokens ({tokens.shape[1]}): {model.to_str_tokens(tokens)}")

    with torch.inference_mode():
        start = time.perf_counter()
        logits, cache = model.run_with_cache(tokens)
        elapsed = time.perf_counter() - start
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(args.top_k)
    print(f"\ntop {args.top_k} next tokens:")
    for rank, (p, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"  {rank:>2}. {model.to_string([idx])!r:<16} {p:7.2%}")

    print(f"\nrun_with_cache: {len(cache)} activations in {elapsed:.2f}s, {_format_bytes(cache.nbytes())}")
    for line in cache_summary(cache):
        print("  " + line)
    if not args.no_generate:
        from mechscope.model.generate import generation_tour

        generation_tour(model, args.prompt)
    if not args.no_heads:
        from mechscope.analysis.tour import heads_tour

        heads_tour(model, out_dir=args.out_dir)
    if args.toys:
        from mechscope.toys.cli import tour_toys

        tour_toys()
    if args.sae:
        from mechscope.sae.run import tour_section

        tour_section(model)
    if args.ioi or args.ioi_full:
        from mechscope.patching.tour import ioi_tour

        ioi_tour(model, out_dir=args.out_dir, full=args.ioi_full)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mechscope", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tour", help="load the bundled model, predict, and summarise an activation cache")
    p.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory, .gguf file or hub id")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--device", default=None, help="e.g. cpu or cuda (default: cuda when available)")
    p.add_argument("--no-heads", action="store_true", help="skip the head detectors section")
    p.add_argument("--no-generate", action="store_true", help="skip the generation section")
    p.add_argument("--out-dir", default="mechscope-tour", help="where HTML views are written")
    p.add_argument("--toys", action="store_true", help="also train the toy models (grokking, superposition, "
                   "induction; under a minute)")
    p.add_argument("--sae", action="store_true", help="also train and evaluate a small SAE (a minute or two)")
    p.add_argument("--ioi", action="store_true", help="also run IOI activation patching and AtP* with an HTML "
                   "report (quick: 4 prompts, the residual stream at every third layer; about a minute on CPU)")
    p.add_argument("--ioi-full", action="store_true", help="the IOI section with 8 prompts and every layer "
                   "(several minutes on CPU)")
    p.set_defaults(func=tour)
    from mechscope.toys.cli import add_toys_parser

    add_toys_parser(sub)
    from mechscope.sae.run import add_sae_parser

    add_sae_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        from mechscope.errors import MechscopeError

        if isinstance(exc, MechscopeError):
            print(f"mechscope: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

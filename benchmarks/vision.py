"""Vision forward benchmark: mechscope's hooked ViT against ``transformers``' ViT.

What it measures, on a randomly initialised ViT image classifier (default ViT-S/16 sizes: 224px
images, 16px patches, 197 positions, 12 layers, d_model 384, 6 heads, 1000 classes; timing does not
depend on the weights, and no checkpoint is reachable offline), fp32 on CPU with
``torch.set_num_threads(--threads)``, for one batch of random pixels (fixed seed, the same for every
contender), all under ``torch.inference_mode()``:

  * ``hf``: ``ViTForImageClassification(pixel_values=...)`` (its default SDPA attention);
  * ``ms``: ``model(pixels)`` for the same weights loaded with ``mechscope.load``;
  * ``ms_cache``: ``model.run_with_cache(pixels)`` caching every hook point (no names filter).

One warm-up call each, then ``--runs`` rounds (``common.interleave``): every round times each
contender once, in an order rotated round by round, so a burst of load from other processes hits
them alike; a sample during which other processes took more than ``--gate`` cores is retaken (at
most ``--retries`` times, then kept and the contender marked not recordable). Reported per
contender: median, min, max and spread of the seconds and the cores other processes took during
each kept sample; per ratio (``ms / hf``, ``ms_cache / hf``): the ratio of the medians and the
median, min and max of the per-round ratios; the 1-minute load average at the start and the end;
and the largest logit difference. ``--clock cpu`` times each call by the CPU time of this process
instead of the wall clock: on a machine whose cores other processes share, the wall clock counts
the time spent waiting for a core, the process clock (with ``--threads 1``) only the work done.
``--json`` writes everything.

Run from the repository root:

    .venv/bin/python benchmarks/vision.py [--runs 7] [--batch 4] [--size small|base|tiny] [--threads 2]
                                          [--gate 0.25] [--retries 1] [--clock wall|cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MECHSCOPE_NO_SHAPE_CHECKS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402

SIZES = {
    "tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
    "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def build(size: str, folder: Path):
    """A random ViT classifier saved to ``folder``: ``(transformers model, mechscope model)``."""
    from transformers import ViTConfig, ViTForImageClassification

    import mechscope as ms

    config = ViTConfig(**SIZES[size], image_size=224, patch_size=16, num_labels=1000)
    torch.manual_seed(0)
    hf_model = ViTForImageClassification(config).eval()
    hf_model.save_pretrained(folder)
    return hf_model, ms.load(folder, device="cpu")


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def on_clock(fn, clock: str):
    """``fn`` as a job for ``common.interleave``: timed by the wall clock, or returning the CPU
    seconds this process spent in it (a float, which ``common.timed_sample`` takes as the sample)."""
    if clock == "wall":
        return fn

    def job() -> float:
        start = time.process_time()
        fn()
        return time.process_time() - start

    return job


def log(message: str) -> None:
    sys.stderr.write(message + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (each times every contender once)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES, help="retake samples above this load")
    parser.add_argument("--retries", type=int, default=1, help="retakes of a sample taken under load")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what a sample measures")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be at least 3 (a median and a spread)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        hf_model, model = build(args.size, Path(folder))
    pixels = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = {
        "hf": lambda: hf_model(pixel_values=pixels).logits,
        "ms": lambda: model(pixels),
        "ms_cache": lambda: model.run_with_cache(pixels)[0],
    }
    contenders = {name: on_clock(fn, args.clock) for name, fn in calls.items()}
    with torch.inference_mode():
        outputs = {name: fn() for name, fn in calls.items()}  # warm-up
        diff = (outputs["ms"][:, 0] - outputs["hf"]).abs().max().item()
        n_cached = len(model.run_with_cache(pixels)[1])
        load_start = os.getloadavg()[0]
        timed = common.interleave(contenders, reps=args.runs, max_other=args.gate, retries=args.retries, log=log)
        load_end = os.getloadavg()[0]
    times = {name: timed[name]["samples_s"] for name in contenders}
    ratios = {
        f"{name}/hf": [t / h for t, h in zip(times[name], times["hf"], strict=True)] for name in ("ms", "ms_cache")
    }
    result = {
        "size": args.size,
        "batch": args.batch,
        "threads": args.threads,
        "clock": args.clock,
        "runs": args.runs,
        "torch": torch.__version__,
        "hf_attention": hf_model.config._attn_implementation,
        "hooks_cached": n_cached,
        "max_abs_logit_diff": diff,
        "max_abs_logit": outputs["hf"].abs().max().item(),
        "seconds": {name: {k: v for k, v in timed[name].items() if k != "last"} for name in contenders},
        "ratio_of_medians": {
            key: statistics.median(times[key.split("/")[0]]) / statistics.median(times["hf"]) for key in ratios
        },
        "per_round_ratio": {key: summary(values) for key, values in ratios.items()},
        "load_average_1min": {"start": load_start, "end": load_end},
        "gate": common.gate_note(timed, args.gate),
    }
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Composition-score benchmark: mechscope.analysis.composition_scores against TransformerLens.

What it measures, on the bundled SmolLM2-135M (30 layers x 9 heads, d_head 64, fp32, CPU,
torch.set_num_threads(2)): the time to compute Q-, K- and V-composition scores between all
head pairs of the first --layers layers (default 8: 72 x 72 pairs), median of --runs runs
after a warm-up, for

  * mechscope ``composition_scores(model, mode)`` on the model cut to those layers: writer OV
    and reader QK/OV kept factored, each pair's Frobenius norm computed from d_head x d_head
    matrices, only pairs with the reader in a later layer;
  * TransformerLens 3.x, the body of ``HookedTransformer.all_composition_scores(mode)`` on the
    same heads (no weight processing; every pair, SVD-collapsed factors broadcast to
    ``[layer, head, layer, head, d_head, d_model]``), in a subprocess under its own venv. On
    all 30 layers that broadcast needs about 11 GB per operand, so the full model is not
    compared; mechscope's time on the full model (270 x 270 pairs) is printed alone.

It checks that both give the same scores (largest absolute difference printed) and reports
the CPU other processes took while it ran. The local HF directory and the TransformerLens
venv are made once (see benchmarks/common.py). Everything runs offline.

Usage: .venv/bin/python benchmarks/analysis.py [--runs 3] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from mechscope.analysis import composition_scores  # noqa: E402

torch.set_num_threads(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    common.ensure_hf_dir()
    tl_python = common.ensure_peer_venv("tl3")
    cpu = common.CpuMonitor() if hasattr(common, "CpuMonitor") else None

    model = ms.load("smollm2-135m", device="cpu")
    full_layers = model.cfg.n_layers

    def timed(mode: str) -> tuple[torch.Tensor, float]:
        samples = []
        for _ in range(args.runs + 1):
            start = time.perf_counter()
            scores = composition_scores(model, mode)
            samples.append(time.perf_counter() - start)
        return scores, statistics.median(samples[1:])

    with torch.inference_mode():
        full_times = {mode: timed(mode)[1] for mode in ("Q", "K", "V")}
        model.blocks = model.blocks[: args.layers]  # composition_scores reads the blocks' weights only
        ours, times = {}, {}
        for mode in ("Q", "K", "V"):
            ours[mode], times[mode] = timed(mode)

    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "tl_scores.pt"
        proc = subprocess.run(
            [
                str(tl_python),
                str(Path(__file__).with_name("analysis_worker.py")),
                str(args.runs),
                str(args.layers),
                str(out_file),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        tl_times = json.loads(proc.stdout.strip().splitlines()[-1])["times"]
        theirs = torch.load(out_file, weights_only=True)

    heads = args.layers * model.cfg.n_heads
    print(
        f"composition scores, SmolLM2-135M, first {args.layers} layers ({heads} x {heads} head pairs), "
        f"median of {args.runs}"
    )
    print(f"{'mode':<5} {'mechscope s':>12} {'TL 3.x s':>10} {'TL / mechscope':>15} {'max |diff|':>11}")
    for mode in ("Q", "K", "V"):
        diff = float((ours[mode] - theirs[mode].to(ours[mode].dtype)).abs().max())
        print(
            f"{mode:<5} {times[mode]:>12.3f} {tl_times[mode]:>10.3f} "
            f"{tl_times[mode] / times[mode]:>15.1f} {diff:>11.2e}"
        )
    print(
        f"mechscope on all {full_layers} layers ({full_layers * model.cfg.n_heads}^2 pairs): "
        + ", ".join(f"{mode} {t:.3f} s" for mode, t in full_times.items())
    )
    if cpu is not None:
        other, steal = cpu.other_cores()
        print(f"CPU taken by other processes while running: {other:.2f} cores (steal {steal:.2f})")


if __name__ == "__main__":
    main()

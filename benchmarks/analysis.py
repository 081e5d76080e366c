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

The two sides are interleaved (``common.interleave``: each round runs every mode of each side
once, in a rotated order; samples taken while other processes used more than the gate are
retaken); TransformerLens stays loaded in a worker process under its own venv between requests.
It checks that both give the same scores (largest absolute difference printed). The local HF
directory and the TransformerLens venv are made once (see benchmarks/common.py). Everything runs
offline.

Usage: .venv/bin/python benchmarks/analysis.py [--runs 3] [--layers 8]
"""

from __future__ import annotations

import argparse
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
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (at least 3 under the rules)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES)
    args = parser.parse_args()
    common.ensure_hf_dir()
    tl_python = common.ensure_peer_venv("tl3")
    model = ms.load("smollm2-135m", device="cpu")
    full_layers = model.cfg.n_layers
    modes = ("Q", "K", "V")
    ours: dict[str, torch.Tensor] = {}

    def ours_job(mode: str):
        def job() -> float:
            with torch.inference_mode():
                start = time.perf_counter()
                ours[mode] = composition_scores(model, mode)
                return time.perf_counter() - start

        return job

    with torch.inference_mode():
        for mode in modes:
            composition_scores(model, mode)  # warm-up
    full = common.interleave({mode: ours_job(mode) for mode in modes}, reps=args.runs, max_other=args.gate)
    model.blocks = model.blocks[: args.layers]  # composition_scores reads the blocks' weights only
    worker = common.Worker(
        tl_python, [str(Path(__file__).with_name("analysis_worker.py")), str(args.layers)],
        common.BENCH_DIR / "results" / "analysis_worker.log",
    )  # fmt: skip
    try:
        jobs = {}
        for mode in modes:
            ours_job(mode)()  # warm-up
            worker.request({"op": "run", "mode": mode})
            jobs[f"mechscope {mode}"] = ours_job(mode)
            jobs[f"TL {mode}"] = lambda mode=mode: worker.request({"op": "run", "mode": mode})
        timed = common.interleave(jobs, reps=args.runs, max_other=args.gate)
        with tempfile.TemporaryDirectory() as tmp:
            out_file = Path(tmp) / "tl_scores.pt"
            worker.request({"op": "save", "path": str(out_file)})
            theirs = torch.load(out_file, weights_only=True)
    finally:
        worker.close()

    heads = args.layers * model.cfg.n_heads
    print(
        f"\ncomposition scores, SmolLM2-135M, first {args.layers} layers ({heads} x {heads} head pairs), "
        f"median of {args.runs} interleaved rounds (spread = (max - min) / median)"
    )
    print("| mode | mechscope | TL 3.x | TL / mechscope (median) | spread mechscope / TL | max abs difference |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        a, b = timed[f"mechscope {mode}"], timed[f"TL {mode}"]
        diff = float((ours[mode] - theirs[mode].to(ours[mode].dtype)).abs().max())
        print(
            f"| {mode} | {a['median_s']:.3f} s | {b['median_s']:.3f} s | {b['median_s'] / a['median_s']:.1f} | "
            f"{a['spread']:.2f} / {b['spread']:.2f} | {diff:.1e} |"
        )
    print(
        f"mechscope on all {full_layers} layers ({full_layers * model.cfg.n_heads}^2 pairs), median: "
        + ", ".join(f"{mode} {full[mode]['median_s']:.3f} s (spread {full[mode]['spread']:.2f})" for mode in modes)
    )
    print(common.gate_note({**timed, **{f"full {m}": r for m, r in full.items()}}, args.gate))


if __name__ == "__main__":
    main()

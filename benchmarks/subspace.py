"""DAS training benchmark: mechscope vs pyvene 0.1.8 on the bundled SmolLM2-135M, one run.

    .venv/bin/python benchmarks/subspace.py [--layer 22] [--steps 150] [--batch 32] [--threads 1]

Both libraries learn a one-dimensional subspace of the residual stream entering block
``--layer`` (mechscope ``blocks.{layer}.hook_resid_pre``, pyvene ``block_input`` of the same
layer) at the final token, by interchange-intervention training with a low-rank orthogonal
rotation (pyvene ``LowRankRotatedSpaceIntervention``, mechscope `train_das`), on the same IOI
name-position swap pairs (one template, so no padding), with the same batch size, learning rate
(Adam), steps and cross-entropy on the counterfactual answer, in fp32 on the CPU. pyvene runs in
``benchmarks/.venv-pyvene`` (torch 2.13.0 CPU, then pyvene 0.1.8, on the Hugging Face copy of
the model).

Reported: training steps/s of each over the ``--steps`` of one training run (mechscope also with
its one-off setup, the cached base run and source activations, counted in), the held-out
interchange-intervention accuracy (IIA) each reaches, as each library measures it, and as
mechscope measures pyvene's learned direction (a check that the two sites and metrics agree).
Absolute times depend on the machine's load (``other cores``): compare ratios from one run.
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

import mechscope as ms  # noqa: E402
from mechscope.subspace import DASConfig, interchange_scores, train_das  # noqa: E402
from mechscope.subspace.tasks import ioi_position_pairs  # noqa: E402

PYVENE_VENV = common.BENCH_DIR / ".venv-pyvene"
PYVENE_REQUIREMENTS = ["pyvene==0.1.8"]
WORKER = common.BENCH_DIR / "subspace_worker_pyvene.py"


def ensure_pyvene_venv() -> Path:
    """``benchmarks/.venv-pyvene``: torch pinned first (the CPU build), then pyvene."""
    python = common.venv_python(PYVENE_VENV)
    marker = PYVENE_VENV / ".bench-installed"
    if python.exists() and marker.exists():
        return python
    print(f"[setup] creating {PYVENE_VENV.relative_to(common.REPO_ROOT)} ({common.TORCH_PIN}, pyvene)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PYVENE_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    for requirement in ([common.TORCH_PIN], PYVENE_REQUIREMENTS):
        proc = subprocess.run(pip + requirement, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"pip install {requirement} failed:\n{proc.stderr[-3000:]}")
    marker.write_text(" ".join([common.TORCH_PIN, *PYVENE_REQUIREMENTS]) + "\n")
    return python


def mechscope_run(model, train, test, hook, config: DASConfig) -> dict:
    start = time.perf_counter()
    sub = train_das(model, train, hook, -1, config)
    wall = time.perf_counter() - start
    scores = interchange_scores(model, sub, test)
    return {"steps_per_s": config.steps / sub.seconds, "steps_per_s_with_setup": config.steps / wall,
            "train_seconds": sub.seconds, "setup_seconds": wall - sub.seconds, "iia": scores.iia,
            "logit_diff": scores.logit_diff, "loss_first": sub.losses[0], "loss_last": sub.losses[-1]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=22, help="residual stream entering this block")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the accuracy runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of both sides")
    parser.add_argument("--pyvene-timeout", type=float, default=None,
                        help="seconds before the pyvene run is cut (its steps/s so far is still reported)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32, help="pairs per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--only", choices=["mechscope", "pyvene"], default=None, help="run one side only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    monitor = common.CpuMonitor()
    model = ms.load("smollm2-135m", device="cpu")
    data = ioi_position_pairs(model, n=args.n_train + args.n_test, templates=[0], seed=0)
    assert data.attention_mask is None, "one template gives prompts of one length"
    train, test = data.split(args.n_train)
    hook = f"blocks.{args.layer}.hook_resid_pre"
    config = DASConfig(d_sub=1, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=0)
    results = {"settings": vars(args), "prompt_tokens": data.base_tokens.shape[1]}
    if args.only != "pyvene":
        results["mechscope"] = mechscope_run(model, train, test, hook, config)
        print(f"mechscope: {results['mechscope']}", flush=True)
    if args.only != "mechscope":
        python = ensure_pyvene_venv()
        hf_dir = common.ensure_hf_dir()
        with tempfile.TemporaryDirectory() as tmp:
            pairs, out = Path(tmp) / "pairs.pt", Path(tmp) / "pyvene.json"
            torch.save({"train": vars(train), "test": vars(test)}, pairs)
            flags = {"--hf-dir": hf_dir, "--pairs": pairs, "--out": out, "--basis": Path(tmp) / "basis.pt",
                     "--layer": args.layer, "--steps": args.steps, "--threads": args.threads,
                     "--batch": args.batch, "--lr": args.lr}  # fmt: skip
            cmd = [str(python), str(WORKER)] + [str(x) for pair in flags.items() for x in pair]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**common.OFFLINE_ENV, **_env()},
                                      timeout=args.pyvene_timeout)  # fmt: skip
            except subprocess.TimeoutExpired:
                progress = Path(str(out) + ".progress")
                done = json.loads(progress.read_text()) if progress.exists() else {"steps": 0, "seconds": 0.0}
                proc = None
                rate = done["steps"] / done["seconds"] if done["steps"] else 0.0
                results["pyvene"] = {"error": f"cut after {args.pyvene_timeout}s", **done, "steps_per_s": rate}
            if proc is not None and proc.returncode:
                results["pyvene"] = {"error": (proc.stderr or proc.stdout)[-4000:]}
            elif proc is not None:
                results["pyvene"] = json.loads(out.read_text())
                basis = torch.load(Path(tmp) / "basis.pt", weights_only=True)
                results["pyvene"]["iia_in_mechscope"] = interchange_scores(model, basis, test, hook, -1).iia
            results["pyvene"]["wall_s"] = time.perf_counter() - start
        print(f"pyvene: {results['pyvene']}", flush=True)
    other, steal = monitor.other_cores()
    results["other_cores"], results["steal_cores"] = other, steal
    if "mechscope" in results and "iia" in results.get("pyvene", {}):
        ratio = results["mechscope"]["steps_per_s"] / results["pyvene"]["steps_per_s"]
        results["ratio"] = ratio
        print(f"\nDAS training steps/s: mechscope {results['mechscope']['steps_per_s']:.2f}, "
              f"pyvene {results['pyvene']['steps_per_s']:.2f} (x{ratio:.1f}); held-out IIA after {args.steps} steps: "
              f"mechscope {results['mechscope']['iia']:.3f}, pyvene {results['pyvene']['iia']:.3f} "
              f"(pyvene's direction scored by mechscope: {results['pyvene']['iia_in_mechscope']:.3f})")  # fmt: skip
    print(f"other cores busy during the run: {other:.2f} (steal {steal:.2f})")
    out_dir = common.BENCH_DIR / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "subspace.json").write_text(json.dumps(results, indent=1))


def _env() -> dict:
    import os

    return {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}


if __name__ == "__main__":
    main()

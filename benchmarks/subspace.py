"""DAS training benchmark: mechscope vs pyvene 0.1.8 on the bundled SmolLM2-135M, interleaved runs.

    .venv/bin/python benchmarks/subspace.py [--layer 22] [--steps 100] [--batch 16] [--threads 1] [--rounds 3]

Both libraries learn a one-dimensional subspace of the residual stream entering block
``--layer`` (mechscope ``blocks.{layer}.hook_resid_pre``, pyvene ``block_input`` of the same
layer) at the final token, by interchange-intervention training with a low-rank orthogonal
rotation (pyvene ``LowRankRotatedSpaceIntervention``, mechscope `train_das`), on the same IOI
name-position swap pairs (one template, so no padding), with the same batch size, learning rate
(Adam), steps and cross-entropy on the counterfactual answer, in fp32 on the CPU. pyvene runs in
``benchmarks/.venv-pyvene`` (torch 2.13.0 CPU, then pyvene 0.1.8, on the Hugging Face copy of
the model).

Each round trains both from scratch (same seed each round), in a rotated order
(``common.interleave``: a run during which other processes used more than the gate is retaken);
pyvene stays loaded in a worker process under its own venv between runs. Reported: training
steps/s of each over the ``--steps`` of a run, median and spread over the rounds (mechscope also
with its one-off setup, the cached base run and source activations, counted in), the held-out
interchange-intervention accuracy (IIA) each reaches, as each library measures it, and as
mechscope measures pyvene's learned direction (a check that the two sites and metrics agree).
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
    return {
        "seconds": sub.seconds,
        "steps_per_s": config.steps / sub.seconds,
        "steps_per_s_with_setup": config.steps / wall,
        "train_seconds": sub.seconds,
        "setup_seconds": wall - sub.seconds,
        "iia": scores.iia,
        "logit_diff": scores.logit_diff,
        "loss_first": sub.losses[0],
        "loss_last": sub.losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=22, help="residual stream entering this block")
    parser.add_argument("--steps", type=int, default=100, help="training steps of each run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of both sides")
    parser.add_argument("--batch", type=int, default=16, help="pairs per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-test", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (at least 3 under the rules)")
    parser.add_argument("--gate", type=float, default=common.MAX_OTHER_CORES)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ms.load("smollm2-135m", device="cpu")
    data = ioi_position_pairs(model, n=args.n_train + args.n_test, templates=[0], seed=0)
    assert data.attention_mask is None, "one template gives prompts of one length"
    train, test = data.split(args.n_train)
    hook = f"blocks.{args.layer}.hook_resid_pre"
    config = DASConfig(d_sub=1, steps=args.steps, batch_size=args.batch, lr=args.lr, seed=0)
    results = {"settings": vars(args), "prompt_tokens": data.base_tokens.shape[1]}
    python = ensure_pyvene_venv()
    hf_dir = common.ensure_hf_dir()
    with tempfile.TemporaryDirectory() as tmp:
        pairs, basis = Path(tmp) / "pairs.pt", Path(tmp) / "basis.pt"
        torch.save({"train": vars(train), "test": vars(test)}, pairs)
        flags = {"--hf-dir": hf_dir, "--pairs": pairs, "--layer": args.layer, "--steps": args.steps,
                 "--threads": args.threads, "--batch": args.batch, "--lr": args.lr}  # fmt: skip
        argv = [str(WORKER), "--serve"] + [str(x) for pair in flags.items() for x in pair]
        worker = common.Worker(python, argv, common.BENCH_DIR / "results" / "subspace_worker.log")
        try:
            timed = common.interleave(
                {
                    "mechscope": lambda: mechscope_run(model, train, test, hook, config),
                    "pyvene": lambda: worker.request({"op": "train", "basis": str(basis)}),
                },
                reps=args.rounds,
                max_other=args.gate,
            )
            pyvene_basis = torch.load(basis, weights_only=True)
        finally:
            worker.close()
    ours, theirs = timed["mechscope"], timed["pyvene"]
    for name, r in timed.items():
        results[name] = {**r["last"], "seconds_median": r["median_s"], "spread": r["spread"],
                         "samples_s": r["samples_s"], "other_cores": r["other_cores"]}  # fmt: skip
        results[name]["steps_per_s"] = args.steps / r["median_s"]
    results["pyvene"]["iia_in_mechscope"] = interchange_scores(model, pyvene_basis, test, hook, -1).iia
    results["ratio"] = theirs["median_s"] / ours["median_s"]
    results["gate"] = common.gate_note(timed, args.gate)
    m, p = results["mechscope"], results["pyvene"]
    print(
        f"\nDAS, {args.steps} steps of batch {args.batch}, {args.rounds} interleaved rounds "
        f"(spread = (max - min) / median):"
    )
    print("| | mechscope | pyvene 0.1.8 | ratio |")
    print("|---|---|---|---|")
    print(
        f"| training steps/s (median) | {m['steps_per_s']:.2f} (spread {m['spread']:.2f}) | "
        f"{p['steps_per_s']:.3f} (spread {p['spread']:.2f}) | {results['ratio']:.1f}x |"
    )
    print(
        f"| counting mechscope's one-off setup (last round: {m['setup_seconds']:.1f} s) | "
        f"{m['steps_per_s_with_setup']:.2f} | {p['steps_per_s']:.3f} | "
        f"{m['steps_per_s_with_setup'] / p['steps_per_s']:.1f}x |"
    )
    print(f"| held-out IIA ({args.n_test} pairs) | {m['iia']:.3f} | {p['iia']:.3f} | |")
    print(f"| IIA of pyvene's direction, scored by mechscope | | {p['iia_in_mechscope']:.3f} | |")
    print(
        f"loss first/last: mechscope {m['loss_first']:.3f}/{m['loss_last']:.3f}, "
        f"pyvene {p['loss_first']:.3f}/{p['loss_last']:.3f}"
    )
    print(results["gate"])
    out_dir = common.BENCH_DIR / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "subspace.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

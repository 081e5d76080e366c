"""SAE training benchmark: mechscope vs SAELens on the bundled SmolLM2-135M.

    .venv/bin/python benchmarks/sae.py [--steps 24] [--batch 1024] [--step-runs 20] [--reps 3]

Both libraries train a TopK (k 32) and a standard L1 SAE (d_sae = 4 x d_model = 2304) on
``blocks.6.hook_resid_post`` with the same token rows (the default corpus), batch size, steps,
learning rate and Adam settings; SAELens runs in ``benchmarks/.venv-tl`` (its
``LanguageModelSAETrainingRunner`` with the TransformerLens 3.9 HookedTransformer). Reported:

(a) end-to-end training tokens/s, mechscope / SAELens, and mechscope against the floor
    (model forward to the hook plus the SAE step, timed separately in this run);
(b) SAE optimisation steps alone on cached activations, mechscope / SAELens;
(c) FVU, CE loss recovered and L0 of all four SAEs, measured by one evaluation
    (`mechscope.sae.evaluate_sae`) on held-out rows;
and the throughput of three SAEs at layers 2, 4 and 6 trained from one model pass.

Matched settings: the same initial decoder norm (1, unit rows), the same 8-batch shuffle buffer
(SAELens' ``n_batches_in_buffer`` set so that its buffer holds as many tokens as mechscope's),
no activation normalisation, constant learning rate, Adam (0.9, 0.999), gradient clipping at 1.
Every timed run is repeated ``--reps`` times, interleaved with the other contenders' runs
(``common.interleave``: a run during which other processes took more than 0.25 cores is
retaken); the medians and spreads are reported.
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
from mechscope.data.corpus import cached_token_stream, default_corpus_texts  # noqa: E402
from mechscope.sae import (  # noqa: E402
    ActivationStore,
    SAEConfig,
    SAETrainer,
    TensorSource,
    TrainConfig,
    evaluate_sae,
    load_sae,
    make_sae,
)

HOOK = "blocks.6.hook_resid_post"
CONTEXT, EVAL_ROWS = 128, 8
LR = 1e-3
L1 = {"mechscope": 5.0, "saelens": 5.0}
BUFFER_BATCHES = 8


def sae_cfg(arch: str, hook: str = HOOK) -> SAEConfig:
    extra = {"k": 32} if arch == "topk" else {"sparsity_coefficient": L1["mechscope"]}
    return SAEConfig(d_in=576, d_sae=2304, architecture=arch, hook_name=hook, **extra)


def train_cfg(steps: int, **kw) -> TrainConfig:
    # SAELens' trainer: constant LR, Adam (0.9, 0.999), grad-norm clipping at 1, no unit-norm decoder
    # and (as in the SAELens run) no activation normalisation
    return TrainConfig(
        steps=steps, lr=LR, max_grad_norm=1.0, decoder_constraint="norm_penalty", b_dec_init="zeros",
        normalize_activations=False, dead_window=200, progress=False, log_every=max(steps, 1), **kw,
    )  # fmt: skip


def mechscope_e2e(model, rows: torch.Tensor, arch: str, steps: int, batch: int, hooks=(HOOK,)):
    store = ActivationStore(model, list(hooks), rows.reshape(-1), context_size=CONTEXT, batch_size=batch,
                            buffer_batches=BUFFER_BATCHES, model_batch_size=8, prepend_bos=False)  # fmt: skip
    trainer = SAETrainer([make_sae(sae_cfg(arch, h)) for h in hooks], store, train_cfg(steps))
    start = time.perf_counter()
    saes = trainer.train()
    return {"seconds": time.perf_counter() - start, "saes": saes}


@torch.no_grad()
def forward_floor(model, rows: torch.Tensor, n_tokens: int) -> float:
    """Seconds to run the model to the hook over ``n_tokens`` tokens (8 rows per forward)."""
    n_rows = n_tokens // CONTEXT
    start = time.perf_counter()
    for i in range(0, n_rows, 8):
        model(rows[i : min(i + 8, n_rows)], stop_at_layer=7)
    return time.perf_counter() - start


def mechscope_steps(acts: torch.Tensor, arch: str, steps: int, batch: int) -> float:
    """Seconds for ``steps`` SAE optimisation steps on cached activations (after 3 warm-up steps)."""
    trainer = SAETrainer([make_sae(sae_cfg(arch))], TensorSource({HOOK: acts}, batch), train_cfg(steps + 3))
    trainer.train(stop_after=3)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def saelens(args: list[str]) -> dict:
    python = common.venv_python(common.PEER_VENVS["tl3"][0])
    cmd = [str(python), str(Path(__file__).with_name("sae_worker_saelens.py")), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"SAELens worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="training steps per end-to-end run")
    parser.add_argument("--batch", type=int, default=1024, help="tokens per training batch")
    parser.add_argument("--step-runs", type=int, default=20, help="SAE steps timed on cached activations")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of every run, interleaved")
    parser.add_argument(
        "--gate", type=float, default=common.MAX_OTHER_CORES, help="retake runs while others take more cores"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    common.ensure_hf_dir()
    common.ensure_peer_venv("tl3")

    model = ms.load("smollm2-135m", device="cpu")
    tokens = cached_token_stream(default_corpus_texts(), model.tokenizer, "smollm2-135m-default")
    all_rows = tokens[: tokens.numel() // CONTEXT * CONTEXT].reshape(-1, CONTEXT)
    n_train_rows = args.steps * args.batch // CONTEXT + 8 * 8 * 3  # spare rows for SAELens' norm estimate
    train_rows, eval_rows = all_rows[:n_train_rows].clone(), all_rows[-EVAL_ROWS:].clone()
    n_tokens = args.steps * args.batch
    tmp = Path(tempfile.mkdtemp(prefix="mechscope-sae-bench-"))
    torch.save(train_rows, tmp / "rows.pt")
    print(f"SmolLM2-135M, {HOOK}, d_sae 2304, {args.steps} steps x {args.batch} tokens = {n_tokens:,} tokens per run")
    print(f"{args.reps} interleaved repetitions of every run", flush=True)

    store = ActivationStore(
        model, [HOOK], train_rows.reshape(-1), context_size=CONTEXT, batch_size=4096, buffer_batches=1
    )
    acts = torch.cat([store.next_batch()[HOOK] for _ in range(2)])
    torch.save(acts, tmp / "acts.pt")
    buffer_tokens = BUFFER_BATCHES * args.batch

    jobs = {}
    for arch in ("topk", "standard"):
        out = tmp / f"saelens-{arch}"
        jobs[f"mechscope {arch} e2e"] = lambda a=arch: mechscope_e2e(model, train_rows, a, args.steps, args.batch)
        jobs[f"SAELens {arch} e2e"] = lambda a=arch, o=out: saelens(
            ["e2e", a, tmp / "rows.pt", args.steps, args.batch, LR, L1["saelens"], o, buffer_tokens]
        )
        jobs[f"mechscope {arch} steps"] = lambda a=arch: mechscope_steps(acts, a, args.step_runs, args.batch)
        jobs[f"SAELens {arch} steps"] = lambda a=arch: saelens(
            ["steps", a, tmp / "acts.pt", args.step_runs, args.batch, LR, L1["saelens"]]
        )
    jobs["forward to the hook (floor)"] = lambda: forward_floor(model, train_rows, n_tokens)
    jobs["mechscope three TopK SAEs e2e"] = lambda: mechscope_e2e(
        model, train_rows, "topk", args.steps, args.batch,
        hooks=("blocks.2.hook_resid_post", "blocks.4.hook_resid_post", HOOK),
    )  # fmt: skip
    t = common.interleave(jobs, reps=args.reps, max_other=args.gate)

    print(f"\n{'timed run':<34}{'median s':>10}{'spread':>8}")
    for name, stats in t.items():
        flag = "" if stats["recordable"] else "  (not recordable: load)"
        print(f"{name:<34}{stats['median_s']:>10.2f}{100 * stats['spread']:>7.0f}%{flag}")

    floor_fwd = t["forward to the hook (floor)"]["median_s"]
    print("\n(a) end-to-end training, tokens/s (medians)")
    print(f"{'SAE':<9} {'mechscope':>10} {'SAELens':>9} {'ratio':>7} {'floor':>9} {'ms/floor':>9}")
    for arch in ("topk", "standard"):
        ms_rate = n_tokens / t[f"mechscope {arch} e2e"]["median_s"]
        sl_rate = n_tokens / t[f"SAELens {arch} e2e"]["median_s"]
        floor = n_tokens / (floor_fwd + t[f"mechscope {arch} steps"]["median_s"] / args.step_runs * args.steps)
        print(f"{arch:<9} {ms_rate:>10.0f} {sl_rate:>9.0f} {ms_rate / sl_rate:>6.2f}x {floor:>9.0f} "
              f"{ms_rate / floor:>8.2f}x")  # fmt: skip
    print("\n(b) SAE optimisation steps on cached activations, steps/s (medians)")
    for arch in ("topk", "standard"):
        ms_steps = args.step_runs / t[f"mechscope {arch} steps"]["median_s"]
        sl_steps = args.step_runs / t[f"SAELens {arch} steps"]["median_s"]
        print(f"{arch:<9} {ms_steps:>10.2f} {sl_steps:>9.2f} {ms_steps / sl_steps:>6.2f}x")
    print(f"\n(c) evaluation on {EVAL_ROWS} held-out rows x {CONTEXT} tokens (same code for both; matched settings)")
    print(f"{'SAE':<20} {'L0':>7} {'FVU':>7} {'CE rec.':>8} {'KL':>7}")
    for arch in ("topk", "standard"):
        for who, sae in (
            ("mechscope", t[f"mechscope {arch} e2e"]["last"]["saes"][0]),
            ("SAELens", load_sae(tmp / f"saelens-{arch}")),
        ):
            e = evaluate_sae(model, sae, eval_rows)
            name = f"{arch} {who}"
            print(f"{name:<20} {e.l0:>7.1f} {e.fvu:>7.3f} {e.ce_loss_recovered:>8.3f} {e.kl_spliced:>7.3f}")
    one_sae = t["mechscope topk e2e"]["median_s"]
    three = t["mechscope three TopK SAEs e2e"]["median_s"]
    print(f"\nthree TopK SAEs (layers 2, 4, 6) from one model pass: {n_tokens / three:,.0f} tokens/s "
          f"({one_sae / three:.2f}x the single-SAE rate)")  # fmt: skip
    print(common.gate_note(t, args.gate))


if __name__ == "__main__":
    main()

"""SAE training benchmark: mechscope vs SAELens on the bundled SmolLM2-135M, one run.

    .venv/bin/python benchmarks/sae.py [--steps 24] [--batch 1024] [--step-runs 20]

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
Absolute times depend on the machine and its load (see ``other cores`` in the output):
compare ratios from one run only.
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
                            buffer_batches=8, model_batch_size=8, prepend_bos=False)  # fmt: skip
    trainer = SAETrainer([make_sae(sae_cfg(arch, h)) for h in hooks], store, train_cfg(steps))
    start = time.perf_counter()
    saes = trainer.train()
    return saes, time.perf_counter() - start


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
    args = parser.parse_args()
    torch.set_num_threads(2)
    common.ensure_hf_dir()
    common.ensure_peer_venv("tl3")
    monitor = common.CpuMonitor()

    model = ms.load("smollm2-135m", device="cpu")
    tokens = cached_token_stream(default_corpus_texts(), model.tokenizer, "smollm2-135m-default")
    all_rows = tokens[: tokens.numel() // CONTEXT * CONTEXT].reshape(-1, CONTEXT)
    n_train_rows = args.steps * args.batch // CONTEXT + 8 * 8 * 3  # spare rows for SAELens' norm estimate
    train_rows, eval_rows = all_rows[:n_train_rows].clone(), all_rows[-EVAL_ROWS:].clone()
    n_tokens = args.steps * args.batch
    tmp = Path(tempfile.mkdtemp(prefix="mechscope-sae-bench-"))
    torch.save(train_rows, tmp / "rows.pt")
    print(f"SmolLM2-135M, {HOOK}, d_sae 2304, {args.steps} steps x {args.batch} tokens = {n_tokens:,} tokens per run")

    results: dict[str, dict] = {}
    for arch in ("topk", "standard"):
        [sae], seconds = mechscope_e2e(model, train_rows, arch, args.steps, args.batch)
        sl = saelens(["e2e", arch, tmp / "rows.pt", args.steps, args.batch, LR, L1["saelens"], tmp / f"saelens-{arch}"])
        results[arch] = {"ms_e2e": n_tokens / seconds, "sl_e2e": sl["tokens_per_s"], "ms_sae": sae,
                         "sl_sae": load_sae(tmp / f"saelens-{arch}")}  # fmt: skip

    floor_fwd = forward_floor(model, train_rows, n_tokens)
    store = ActivationStore(
        model, [HOOK], train_rows.reshape(-1), context_size=CONTEXT, batch_size=4096, buffer_batches=1
    )
    acts = torch.cat([store.next_batch()[HOOK] for _ in range(2)])
    torch.save(acts, tmp / "acts.pt")
    for arch in ("topk", "standard"):
        r = results[arch]
        ms_step = mechscope_steps(acts, arch, args.step_runs, args.batch)
        sl = saelens(["steps", arch, tmp / "acts.pt", args.step_runs, args.batch, LR, L1["saelens"]])
        floor_seconds = floor_fwd + ms_step / args.step_runs * args.steps
        r.update(ms_steps=args.step_runs / ms_step, sl_steps=sl["steps_per_s"], floor=n_tokens / floor_seconds)

    _, multi_seconds = mechscope_e2e(model, train_rows, "topk", args.steps, args.batch,
                                     hooks=("blocks.2.hook_resid_post", "blocks.4.hook_resid_post", HOOK))  # fmt: skip
    other, steal = monitor.other_cores()

    print("\n(a) end-to-end training, tokens/s")
    print(f"{'SAE':<9} {'mechscope':>10} {'SAELens':>9} {'ratio':>7} {'floor':>9} {'ms/floor':>9}")
    for arch, r in results.items():
        print(f"{arch:<9} {r['ms_e2e']:>10.0f} {r['sl_e2e']:>9.0f} {r['ms_e2e'] / r['sl_e2e']:>6.2f}x "
              f"{r['floor']:>9.0f} {r['ms_e2e'] / r['floor']:>8.2f}x")  # fmt: skip
    print("\n(b) SAE optimisation steps on cached activations, steps/s")
    for arch, r in results.items():
        print(f"{arch:<9} {r['ms_steps']:>10.2f} {r['sl_steps']:>9.2f} {r['ms_steps'] / r['sl_steps']:>6.2f}x")
    print(f"\n(c) evaluation on {EVAL_ROWS} held-out rows x {CONTEXT} tokens (same code for both)")
    print(f"{'SAE':<20} {'L0':>7} {'FVU':>7} {'CE rec.':>8} {'KL':>7}")
    for arch, r in results.items():
        for who in ("ms", "sl"):
            e = evaluate_sae(model, r[f"{who}_sae"], eval_rows)
            name = f"{arch} {'mechscope' if who == 'ms' else 'SAELens'}"
            print(f"{name:<20} {e.l0:>7.1f} {e.fvu:>7.3f} {e.ce_loss_recovered:>8.3f} {e.kl_spliced:>7.3f}")
    one_sae = results["topk"]["ms_e2e"]
    print(f"\nthree TopK SAEs (layers 2, 4, 6) from one model pass: {n_tokens / multi_seconds:,.0f} tokens/s "
          f"({n_tokens / multi_seconds / one_sae:.2f}x the single-SAE rate)")  # fmt: skip
    print(f"other cores busy during the run: {other:.2f} (steal {steal:.2f})")


if __name__ == "__main__":
    main()

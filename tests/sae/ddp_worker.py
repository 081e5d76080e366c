"""Worker for the DDP test: ``torchrun --nproc_per_node 2 ddp_worker.py OUT_DIR`` (gloo on CPU).

Trains on the same global batches as the single-process reference in ``test_ddp.py``;
rank 0 writes the trained weights and history to ``OUT_DIR``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from mechscope.sae import SAEConfig, SAETrainer, TensorSource, TrainConfig, make_sae
from mechscope.sae.distributed import global_topk_threshold, init_from_env


def data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(24, 16, generator=gen)
    codes = (torch.rand(2048, 24, generator=gen) < 0.1) * torch.rand(2048, 24, generator=gen)
    return codes @ directions + 0.2


def configs() -> list[SAEConfig]:
    return [
        SAEConfig(d_in=16, d_sae=48, architecture="topk", k=3, hook_name="x"),
        SAEConfig(d_in=16, d_sae=48, architecture="batchtopk", k=3, hook_name="x"),
        SAEConfig(d_in=16, d_sae=32, architecture="standard", sparsity_coefficient=0.3, hook_name="x"),
        SAEConfig(
            d_in=16,
            d_sae=32,
            architecture="jumprelu",
            sparsity_coefficient=0.1,
            jumprelu_init_threshold=0.05,
            hook_name="x",
        ),
    ]


def trainer(checkpoint_dir: str | None = None) -> SAETrainer:
    train_cfg = TrainConfig(steps=25, lr=3e-3, lr_warmup_steps=3, lr_decay_steps=5, coefficient_warmup_steps=5,
                            dead_window=4, resample_steps=(12,), progress=False, log_every=5,
                            checkpoint_dir=checkpoint_dir, checkpoint_every=10 if checkpoint_dir else 0)  # fmt: skip
    return SAETrainer(
        [make_sae(c, seed=0) for c in configs()], TensorSource({"x": data()}, batch_size=128, seed=1), train_cfg
    )


def train() -> tuple[list, list]:
    run = trainer()
    return run.train(), run.history


def skewed_batch() -> torch.Tensor:
    """A global batch ``[2, 64, 40]`` of pre-activations whose half for rank 0 is much larger."""
    values = torch.rand(2, 64, 40, generator=torch.Generator().manual_seed(3))
    values[0] *= 3
    return values


def resumed(checkpoint_dir: str) -> list:
    """Interrupted after step 13 (checkpoint at 10), then resumed by a fresh trainer."""
    trainer(checkpoint_dir).train(stop_after=13)
    return trainer(checkpoint_dir).train()


if __name__ == "__main__":
    torch.set_num_threads(1)
    rank, world = init_from_env("gloo")
    saes, history = train()
    again = resumed(sys.argv[1] + "/checkpoints")
    threshold = global_topk_threshold(skewed_batch()[rank], k=4 * 128)
    kept = torch.tensor([int((skewed_batch()[rank] >= threshold).sum())])
    dist.all_reduce(kept)
    exact = all(
        torch.equal(a, b)
        for s, r in zip(saes, again, strict=True)
        for a, b in zip(s.state_dict().values(), r.state_dict().values(), strict=True)
    )
    if rank == 0:
        torch.save(
            {
                "world": world,
                "saes": [s.state_dict() for s in saes],
                "history": history,
                "resume_exact": exact,
                "threshold": threshold,
                "kept": int(kept),
            },
            sys.argv[1] + "/ddp.pt",
        )
    dist.barrier()
    dist.destroy_process_group()

"""Two gloo processes launched by torchrun train the same SAEs as one process on the same batches,
and resume exactly from per-rank checkpoints."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from . import ddp_worker


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_rank_ddp_equals_single_process(tmp_path):
    worker = Path(ddp_worker.__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(worker), str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert ddp["world"] == 2
    assert ddp["resume_exact"]  # each rank resumed from its own checkpoint, bit for bit
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-rank0-of-2.pt",
        "checkpoint-rank1-of-2.pt",
    ]

    # BatchTopK's selection across ranks: the threshold of one process holding the whole batch
    batch = ddp_worker.skewed_batch()
    single_threshold = batch.reshape(-1).topk(4 * 128).values[-1]
    assert ddp["threshold"] == single_threshold and ddp["kept"] == 4 * 128
    assert batch[1].reshape(-1).topk(4 * 64).values[-1] < single_threshold  # a per-rank top-k would differ

    single, history = ddp_worker.train()
    for sae, ddp_state in zip(single, ddp["saes"], strict=True):
        for name, value in sae.state_dict().items():
            torch.testing.assert_close(ddp_state[name], value, atol=2e-5, rtol=1e-4, msg=f"{sae.architecture}.{name}")
    for mine, theirs in zip(history, ddp["history"], strict=True):
        for key, value in mine.items():
            assert abs(theirs[key] - value) <= 1e-3 * max(1.0, abs(value)), key

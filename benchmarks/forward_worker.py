"""Contenders and workloads for ``forward.py``, plus a command-line entry point
so that the same code runs in a fresh subprocess (memory runs) or under a peer
venv's python (TransformerLens).

Contenders (all load the bundled SmolLM2-135M in fp32 on the CPU):
  hf   plain ``transformers`` AutoModelForCausalLM from the local HF directory
  ms   mechscope ``ms.load("smollm2-135m")``
  tl3  TransformerLens 3.x ``HookedTransformer.from_pretrained_no_processing``
  tl4  TransformerLens 4.x ``TransformerBridge.boot_transformers``

Workloads:
  forward  ``model(tokens)`` -> logits
  cache    ``model.run_with_cache(tokens)`` caching every hook (no names_filter)

Subcommands:
  serve  load the contenders, warm each workload up once, then answer requests from the
         benchmark (``common.Worker``): one timed run per request, so that the benchmark can
         interleave these contenders with the others
  mem    load one contender, run one workload as a warm-up, then once more, and write that
         run's peak RSS and its increase over the RSS before it as JSON to --out
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

common.set_offline_env()

import torch  # noqa: E402  (after the offline environment is set)

torch.set_num_threads(2)

WORKLOADS = ("forward", "cache")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load_hf_model():
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(common.HF_DIR, dtype=torch.float32)
    return model.eval()


def _load_hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(common.HF_DIR)


class Contender:
    """A loaded model with the two workloads."""

    name = ""
    label = ""

    def forward(self, tokens):
        raise NotImplementedError

    def run_with_cache(self, tokens):
        """Return ``(logits, cache)`` where cache maps hook names to tensors."""
        raise NotImplementedError

    def versions(self) -> dict:
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}


class HFContender(Contender):
    name = "hf"
    label = "transformers forward"

    def __init__(self):
        self.model = _load_hf_model()
        self.attn = self.model.config._attn_implementation

    def forward(self, tokens):
        # use_cache=False: no KV cache is built, as in the hooked models' forward.
        return self.model(tokens, use_cache=False).logits


class MechscopeContender(Contender):
    name = "ms"
    label = "mechscope"

    def __init__(self):
        import mechscope as ms

        self.ms = ms
        self.model = ms.load("smollm2-135m", device="cpu")

    def forward(self, tokens):
        return self.model(tokens)

    def run_with_cache(self, tokens):
        return self.model.run_with_cache(tokens)

    def versions(self) -> dict:
        return {**super().versions(), "mechscope": getattr(self.ms, "__version__", "dev")}


class HookedTransformerContender(Contender):
    name = "tl3"
    label = "TL HookedTransformer"

    def __init__(self):
        import transformer_lens.supported_models as supported
        from transformer_lens import HookedTransformer

        _quiet_transformers()
        local = str(common.HF_DIR)
        if "llama" in local.lower():
            raise RuntimeError(f"HookedTransformer mis-configures paths containing 'llama': {local}")
        # HookedTransformer only accepts names from this list (the same object its loader reads).
        if local not in supported.OFFICIAL_MODEL_NAMES:
            supported.OFFICIAL_MODEL_NAMES.append(local)
        hf_model = _load_hf_model()
        self.model = HookedTransformer.from_pretrained_no_processing(
            local,
            hf_model=hf_model,
            tokenizer=_load_hf_tokenizer(),
            device="cpu",
            dtype=torch.float32,
        ).eval()
        del hf_model

    def forward(self, tokens):
        return self.model(tokens)

    def run_with_cache(self, tokens):
        return self.model.run_with_cache(tokens)

    def versions(self) -> dict:
        from importlib.metadata import version

        return {**super().versions(), "transformer_lens": version("transformer-lens")}


class BridgeContender(HookedTransformerContender):
    name = "tl4"
    label = "TL TransformerBridge"

    def __init__(self):
        from transformer_lens.model_bridge import TransformerBridge

        _quiet_transformers()
        self.model = TransformerBridge.boot_transformers(str(common.HF_DIR), device="cpu", dtype=torch.float32).eval()


CONTENDERS = {c.name: c for c in (HFContender, MechscopeContender, HookedTransformerContender, BridgeContender)}


# Plain transformers has no hooks, so no run_with_cache.
WORKLOADS_OF = {name: ("forward",) if name == "hf" else WORKLOADS for name in CONTENDERS}


def run_workload(contender: Contender, workload: str, tokens):
    if workload == "forward":
        return contender.forward(tokens)
    if workload == "cache":
        return contender.run_with_cache(tokens)
    raise ValueError(workload)


def cache_stats(cache) -> dict:
    """Number of cached entries and their size, counting shared storage once."""
    seen, total, entries = set(), 0, 0
    for tensor in cache.values():
        entries += 1
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return {"entries": entries, "unique_tensors": len(seen), "mib": total / 2**20}


def load_tokens(path: str | Path):
    return torch.load(path, weights_only=True)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def load_contender(name: str) -> tuple[Contender, float]:
    start = time.perf_counter()
    contender = CONTENDERS[name]()
    return contender, time.perf_counter() - start


def timed_workload(contender: Contender, workload: str, tokens) -> float:
    """Seconds of one run of ``workload`` (under inference mode); the output is freed afterwards, untimed."""
    with torch.inference_mode():
        start = time.perf_counter()
        out = run_workload(contender, workload, tokens)
        seconds = time.perf_counter() - start
    del out
    release_memory()
    return seconds


def warm_up(contender: Contender, tokens) -> dict:
    """Run each workload of ``contender`` once; returns the cache statistics of its run_with_cache."""
    stats = {}
    with torch.inference_mode():
        for workload in WORKLOADS_OF[contender.name]:
            out = run_workload(contender, workload, tokens)
            if workload == "cache":
                stats = cache_stats(out[1])
            del out
            release_memory()
    return stats


def serve(names: list[str], tokens) -> None:
    """Keep the contenders ``names`` loaded and answer `common.Worker` requests: ``info`` (load
    times, versions, cache statistics after a warm-up), ``logits`` (save the forward logits to
    ``path``) and ``run`` (seconds of one run of ``workload`` by ``contender``)."""
    contenders, info = {}, {"load_s": {}, "versions": {}, "cache": {}}
    for name in names:
        contenders[name], info["load_s"][name] = load_contender(name)
        info["versions"][name] = contenders[name].versions()
        info["cache"][name] = warm_up(contenders[name], tokens)

    def logits(request: dict) -> dict:
        torch.save(forward_logits(contenders[request["contender"]], tokens), request["path"])
        return {}

    def run(request: dict) -> dict:
        return {"seconds": timed_workload(contenders[request["contender"]], request["workload"], tokens)}

    common.serve({"info": lambda request: info, "logits": logits, "run": run})


def forward_logits(contender: Contender, tokens):
    with torch.inference_mode():
        return contender.forward(tokens).float()


def measure_memory(name: str, workload: str, tokens) -> dict:
    """Peak RSS of one workload in this (fresh) process.

    The model is loaded, then the workload runs once as a warm-up: weights
    that are memory-mapped become resident only when first used, and
    first-call work (kernel code pages, lazily built buffers) lands here too.
    After each step garbage is collected and freed heap handed back to the OS.
    The RSS then is the resident model; the peak-RSS counter is reset to it and
    the workload runs once more: its peak and the increase over that RSS are
    the figures reported."""
    contender, load_s = load_contender(name)
    release_memory()
    load_peak = common.peak_rss_mib()
    after_load = common.current_rss_mib()
    reset = common.reset_peak_rss()
    with torch.inference_mode():
        out = run_workload(contender, workload, tokens)
        del out
        release_memory()
        warmup_peak = common.peak_rss_mib()
        before_run = common.current_rss_mib()
        reset = common.reset_peak_rss() and reset
        out = run_workload(contender, workload, tokens)
        del out
    run_peak = common.peak_rss_mib()
    if not reset:  # the counter still holds the earlier peaks
        run_peak = max(run_peak, warmup_peak, load_peak)
    return {
        "contender": name,
        "workload": workload,
        "load_s": load_s,
        "load_peak_mib": load_peak,
        "rss_after_load_mib": after_load,
        "warmup_peak_mib": warmup_peak,
        "rss_before_run_mib": before_run,
        "peak_mib": run_peak,
        "increase_mib": run_peak - before_run,
        "peak_reset": reset,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("serve")
    t.add_argument("--contenders", required=True, help="comma-separated: " + ",".join(CONTENDERS))
    m = sub.add_parser("mem")
    m.add_argument("--contender", required=True, choices=list(CONTENDERS))
    m.add_argument("--workload", required=True, choices=list(WORKLOADS))
    m.add_argument("--out", required=True, help="JSON result file")
    for p in (t, m):
        p.add_argument("--tokens", required=True, help="torch.save'd LongTensor [batch, pos]")
    args = parser.parse_args(argv)

    tokens = load_tokens(args.tokens)
    if args.command == "mem":
        Path(args.out).write_text(json.dumps(measure_memory(args.contender, args.workload, tokens), indent=1))
    else:
        serve(args.contenders.split(","), tokens)


if __name__ == "__main__":
    main()

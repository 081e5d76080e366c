"""Memory benchmark: streaming DLA + logit lens against the cached recipes, and the cache's storage options.

What it measures, on the bundled SmolLM2-135M (fp32, CPU, two threads), each sample in a fresh
process (peak RSS above the RSS after loading and a small warm-up, from VmHWM reset through
/proc/self/clear_refs; wall time of the measured call), contenders interleaved run by run:

  * ``cached``: mechscope's cached recipe at --batch x --seq tokens: ``run_with_cache`` of the
    hooks DLA and the logit lens read (embed, attn_out, mlp_out, resid_pre, resid_post,
    ln_final.hook_scale), then ``direct_logit_attribution(cache, answer)`` and
    ``logit_lens(cache, pos=-1)``;
  * ``streaming``: ``run_streams`` of ``dla_stream`` and ``logit_lens_stream(pos=-1)`` (one forward
    stopping before the unembedding), no cache;
  * ``tl``: TransformerLens 3.x's cached recipe on the same tokens (``run_with_cache`` of the same
    hooks, ``decompose_resid`` + ``logit_attrs``, ``accumulated_resid(apply_ln=True)`` @ ``W_U``),
    in its own venv (benchmarks/.venv-tl) when it exists;
  * ``cache_fp32``, ``cache_bf16``, ``cache_last``, ``cache_bf16_last``: ``run_with_cache`` of
    every hook at --cache-batch x --cache-seq tokens by default, with ``cache_dtype=torch.bfloat16``,
    with ``pos_slice=[-1]`` and with both: bytes held by the cache, peak RSS increase and time.

The streaming and cached DLA values are checked equal (largest difference printed). The load
average is printed before and after.

Usage: .venv/bin/python benchmarks/memory.py [--runs 3] [--batch 8] [--seq 512] [--cache-seq 128]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

NAMES = ("hook_embed", "hook_attn_out", "hook_mlp_out", "hook_resid_pre", "hook_resid_post", "ln_final.hook_scale")
ANALYSES = ("cached", "streaming", "tl")
CACHES = ("cache_fp32", "cache_bf16", "cache_last", "cache_bf16_last")


def wanted(name: str) -> bool:
    return name.endswith(NAMES)


def worker(contender: str, token_file: Path) -> dict:
    """One measured sample in this process (mechscope contenders)."""
    import torch
    from safetensors.torch import load_file

    import mechscope as ms
    from mechscope.analysis import direct_logit_attribution, logit_lens
    from mechscope.analysis.streaming import dla_stream, logit_lens_stream, run_streams

    torch.set_num_threads(2)
    data = load_file(token_file)
    tokens, answers = data["tokens"], data["answers"]
    model = ms.load("smollm2-135m", device="cpu")

    def run(tokens, answers):
        if contender == "cached":
            _, cache = model.run_with_cache(tokens, names_filter=wanted)
            dla = direct_logit_attribution(cache, answers)
            return dla.values, logit_lens(cache, pos=-1).logits, 0
        if contender == "streaming":
            dla, lens = run_streams(
                model, tokens, dla_stream(model, tokens, answers), logit_lens_stream(model, tokens, -1)
            )
            return dla.values, lens.logits, 0
        options = {
            "cache_fp32": {},
            "cache_bf16": {"cache_dtype": torch.bfloat16},
            "cache_last": {"pos_slice": [-1]},
            "cache_bf16_last": {"cache_dtype": torch.bfloat16, "pos_slice": [-1]},
        }[contender]
        _, cache = model.run_with_cache(tokens, **options)
        return None, None, sum(t.numel() * t.element_size() for t in cache.values())

    with torch.no_grad():
        run(tokens[:1, :16], answers[:1])
    gc.collect()
    common.reset_peak_rss()
    rss0 = common.current_rss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        dla, lens, nbytes = run(tokens, answers)
    seconds = time.perf_counter() - start
    peak = common.peak_rss_mib() - rss0
    out = {"seconds": seconds, "peak_mib": peak, "cache_bytes": nbytes}
    if dla is not None:
        out["dla"] = dla.tolist()
        out["lens_top"] = lens[-1, :, 0].argmax(-1).tolist()
    return out


def sample(contender: str, token_file: Path, tl_python: Path | None) -> dict:
    here = Path(__file__).resolve()
    if contender == "tl":
        cmd = [str(tl_python), str(here.with_name("memory_worker_tl.py")), str(token_file)]
    else:
        cmd = [sys.executable, str(here), "--worker", contender, "--tokens", str(token_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ})
    if done.returncode != 0:
        raise RuntimeError(f"{contender} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    med = statistics.median(values)
    spread = (max(values) - min(values)) / med
    return f"median {med:9.1f}  min {min(values):9.1f}  max {max(values):9.1f}  spread {spread:5.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--cache-batch", type=int, default=8)
    parser.add_argument("--cache-seq", type=int, default=128)
    parser.add_argument("--skip-caches", action="store_true")
    parser.add_argument("--worker", choices=[*ANALYSES, *CACHES])
    parser.add_argument("--tokens", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens)))
        return

    import torch
    from safetensors.torch import save_file

    tl_venv = common.PEER_VENVS["tl3"][0]
    tl_python = common.venv_python(tl_venv) if tl_venv.exists() else None
    contenders = [c for c in ANALYSES if c != "tl" or tl_python is not None]
    if tl_python is not None:
        common.ensure_hf_dir()
    print(f"load average before: {os.getloadavg()}")
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kind, (batch, seq) in {
            "analysis": (args.batch, args.seq),
            "cache": (args.cache_batch, args.cache_seq),
        }.items():
            files[kind] = Path(tmp) / f"{kind}.safetensors"
            tokens = torch.randint(1, 49152, (batch, seq), generator=gen)
            save_file({"tokens": tokens, "answers": torch.randint(1, 49152, (batch,), generator=gen)}, files[kind])
        results: dict[str, list[dict]] = {}
        order = [(c, "analysis") for c in contenders] + ([] if args.skip_caches else [(c, "cache") for c in CACHES])
        for run in range(args.runs):
            for contender, kind in order:
                out = sample(contender, files[kind], tl_python)
                results.setdefault(contender, []).append(out)
                print(
                    f"run {run} {contender:16s} {out['seconds']:7.2f} s  peak +{out['peak_mib']:8.1f} MiB", flush=True
                )
    print(f"load average after: {os.getloadavg()}")
    print(f"\nDLA + logit lens at {args.batch}x{args.seq} tokens (peak RSS increase MiB, seconds):")
    for contender in contenders:
        rows = results[contender]
        print(f"  {contender:10s} peak {summary([r['peak_mib'] for r in rows])}")
        print(f"  {'':10s} time {summary([r['seconds'] for r in rows])}")
    med = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("peak_mib", "seconds")} for c in contenders}
    print(
        f"  streaming / cached: peak {med['streaming']['peak_mib'] / med['cached']['peak_mib']:.3f}x, "
        f"time {med['streaming']['seconds'] / med['cached']['seconds']:.3f}x"
    )
    if "tl" in med:
        print(
            f"  streaming / TransformerLens: peak {med['streaming']['peak_mib'] / med['tl']['peak_mib']:.3f}x, "
            f"time {med['streaming']['seconds'] / med['tl']['seconds']:.3f}x"
        )
    dla_diff = max(
        abs(a - b)
        for x, y in zip(results["cached"][0]["dla"], results["streaming"][0]["dla"], strict=True)
        for a, b in zip(x, y, strict=True)
    )
    print(f"  largest |cached - streaming| DLA difference: {dla_diff:.2e}")
    if args.skip_caches:
        return
    print(f"\nrun_with_cache of every hook at {args.cache_batch}x{args.cache_seq} tokens:")
    for contender in CACHES:
        rows = results[contender]
        print(f"  {contender:16s} cache {rows[0]['cache_bytes'] / 2**20:9.1f} MiB")
        print(f"  {'':16s} peak  {summary([r['peak_mib'] for r in rows])}")
        print(f"  {'':16s} time  {summary([r['seconds'] for r in rows])}")
    full = results["cache_fp32"][0]["cache_bytes"]
    for contender in CACHES[1:]:
        print(f"  {contender} / cache_fp32 bytes: {results[contender][0]['cache_bytes'] / full:.4f}")


if __name__ == "__main__":
    main()

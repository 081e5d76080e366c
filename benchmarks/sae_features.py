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
    Pearson correlation of its estimates with the exact effects of the first sweep.

The by-feature sweep is also compared with a loop whose forwards start at the SAE's block (from
the cached residual stream), which separates the gain of batching from the gain of skipping
the blocks before the SAE. Each figure is a ratio against the loop measured in the same run,
with the largest absolute difference between the two results (they must agree to float
rounding); every call runs ``--reps`` times, interleaved (``common.interleave``: a sample during
which other processes took more than 0.25 cores is retaken), medians and spreads reported.

Run from the repository root with the project's venv:

    .venv/bin/python benchmarks/sae_features.py [--prompts 4] [--features 48] [--pos-features 8] [--reps 3]
                                                [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.set_offline_env()

import torch  # noqa: E402

torch.set_num_threads(2)
HOOK = "blocks.6.hook_resid_post"
ACTS = f"{HOOK}.hook_sae_acts_post"


def loop_sweep(model, sae, base, source_acts, metric, cells, start_at_layer=None) -> torch.Tensor:
    """One spliced forward per ``(pos or None, feature)`` cell: the oracle the batch is checked against.

    With ``start_at_layer``, ``base`` is the residual stream entering that layer (the forwards
    skip the blocks before the SAE, as the batched sweep does); otherwise it is the tokens."""
    from mechscope.sae import run_with_saes

    out = []
    for pos, feature in cells:

        def patch(acts, *, hook, pos=pos, feature=feature):
            acts = acts.clone()
            where = slice(None) if pos is None else pos
            acts[:, where, feature] = source_acts[:, where, feature]
            return acts

        with torch.no_grad():
            logits = run_with_saes(
                model, base, saes=sae, use_error_term=True, fwd_hooks=[(ACTS, patch)], start_at_layer=start_at_layer
            )
        out.append(metric(logits).mean())
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--features", type=int, default=48)
    parser.add_argument("--pos-features", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of every call, interleaved")
    parser.add_argument(
        "--gate", type=float, default=common.MAX_OTHER_CORES, help="retake samples while others take more cores"
    )
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
    layer = int(HOOK.split(".")[1])
    with torch.no_grad():
        _, resid = model.run_with_cache(corrupted, names_filter=[f"blocks.{layer}.hook_resid_pre"])
    corrupted_resid = resid[f"blocks.{layer}.hook_resid_pre"]
    cells = [(p, f) for p in range(n_pos) for f in pos_chosen]
    feature_cells = [(None, f) for f in chosen]
    jobs = {
        "by feature, batched": lambda: feature_patch(model, sae, clean, corrupted, metric, features=chosen)[ACTS],
        "by feature, loop from block 0": lambda: loop_sweep(model, sae, corrupted, clean_acts, metric, feature_cells),
        "by feature, loop from the SAE's block": lambda: loop_sweep(
            model, sae, corrupted_resid, clean_acts, metric, feature_cells, start_at_layer=layer
        ),
        "by position x feature, batched": lambda: feature_patch(
            model, sae, clean, corrupted, metric, by=("pos", "d_sae"), features=pos_chosen
        )[ACTS],
        "by position x feature, loop from block 0": lambda: loop_sweep(
            model, sae, corrupted, clean_acts, metric, cells
        ),
        "AtP, every feature": lambda: feature_attribution_patch(model, sae, clean, corrupted, metric),
    }
    feature_patch(model, sae, clean, corrupted, metric, features=chosen[:2])  # warm-up
    t = common.interleave(jobs, reps=args.reps, max_other=args.gate)
    for name, stats in t.items():
        flag = "" if stats["recordable"] else "  (not recordable: load)"
        print(f"{name:<42}{stats['median_s']:>8.2f} s  spread {100 * stats['spread']:3.0f}%{flag}")

    batched = t["by feature, batched"]["last"]
    for key, base_name, loops in (
        (
            "by_feature",
            "by feature, batched",
            ("by feature, loop from block 0", "by feature, loop from the SAE's block"),
        ),
        ("by_pos_feature", "by position x feature, batched", ("by position x feature, loop from block 0",)),
    ):
        mine = t[base_name]
        figures[key] = {"batched_s": mine["median_s"], "batched_spread": mine["spread"]}
        for loop in loops:
            other = t[loop]
            label = "from_sae_block" if "SAE's block" in loop else "from_block_0"
            figures[key][label] = {
                "loop_s": other["median_s"],
                "speedup": other["median_s"] / mine["median_s"],
                "max_abs_diff": float((mine["last"].flatten() - other["last"]).abs().max()),
            }
            print(f"{key:15s} vs loop {label:15s}: speedup {other['median_s'] / mine['median_s']:5.2f}x, "
                  f"max |diff| {figures[key][label]['max_abs_diff']:.2e}")  # fmt: skip

    with torch.no_grad():
        base_value = metric(model(corrupted)).mean()
    exact = batched - base_value
    estimate = t["AtP, every feature"]["last"][ACTS][chosen]
    figures["atp"] = {"seconds": t["AtP, every feature"]["median_s"],
                      "loop_s_per_feature": t["by feature, loop from block 0"]["median_s"] / len(chosen),
                      "pearson_vs_exact": float(torch.corrcoef(torch.stack([estimate, exact]))[0, 1])}  # fmt: skip
    a = figures["atp"]
    print(f"AtP (every feature) {a['seconds']:.2f} s; Pearson r with exact effects {a['pearson_vs_exact']:.3f}")
    figures["gate"] = common.gate_note(t, args.gate)
    print(figures["gate"])
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

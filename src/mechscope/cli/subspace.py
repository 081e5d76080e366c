"""``mechscope subspace ioi|steer``: DAS and the illusion check on IOI; steering a generation.

``ioi`` localises the IOI name-position signal at the final token (activation patching of the
residual stream), learns a direction there with DAS, learns directions in MLP hidden layers,
scores each on held-out pairs beside a random direction and the whole activation, runs the
interpretability-illusion check on each, prints the tables and writes ``results.json``, the
check's HTML/PNG figures and the learned subspaces. The computing lives in `mechscope.subspace`;
this module prints.

Run as ``mechscope subspace ioi`` and ``mechscope subspace steer`` (``--help`` lists the flags).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def localise(model, data, progress: bool) -> dict:
    """The metric after patching the final token's residual stream at each layer, and the effect
    of patching each head's query at the final token in the two layers from the last one where
    that patch matters (the heads that read the signal: their outputs copy the same name in both
    prompts, so their queries, not their outputs, differ)."""
    import torch

    from mechscope.patching import activation_patch

    n_layers, last = model.cfg.n_layers, data.base_tokens.shape[1] - 1
    common = dict(attention_mask=data.attention_mask, progress=progress)
    resid = activation_patch(
        model, data.source_tokens, data.base_tokens, data.metric(), "resid_pre", ("pos",),
        patches=[[layer, last] for layer in range(n_layers)], **common,
    )  # fmt: skip
    with torch.no_grad():
        unpatched = float(data.metric()(model(data.base_tokens, attention_mask=data.attention_mask)).mean())
    effect = resid - unpatched
    best = float(effect.max())
    strong = [layer for layer in range(n_layers) if float(effect[layer]) >= 0.9 * best]
    layer = max(strong)  # the last layer whose input still carries the signal: the readers' input
    head_layers = list(range(layer, min(layer + 2, n_layers)))
    heads = activation_patch(
        model, data.source_tokens, data.base_tokens, data.metric(), "q", ("pos", "head"),
        patches=[[hl, last, h] for hl in head_layers for h in range(model.cfg.n_heads)], **common,
    )  # fmt: skip
    ranked = sorted(
        ((hl, h, float(heads[i]) - unpatched) for i, (hl, h) in
         enumerate((hl, h) for hl in head_layers for h in range(model.cfg.n_heads))),
        key=lambda t: -abs(t[2]),
    )  # fmt: skip
    return {"unpatched": unpatched, "resid_effect": effect.tolist(), "layer": layer, "heads": ranked}


def cli_ioi(args: argparse.Namespace) -> int:
    """``mechscope subspace ioi``: see the module docstring.

    Example:
        >>> from mechscope.cli import build_parser
        >>> build_parser().parse_args(["subspace", "ioi", "--steps", "10"]).steps
        10
    """
    import torch

    import mechscope as ms
    from mechscope.names import act_name
    from mechscope.subspace import (
        DASConfig,
        InterchangeRun,
        head_readers,
        illusion_check,
        interchange_scores,
        train_das,
    )  # fmt: skip
    from mechscope.subspace.tasks import ioi_position_pairs

    torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = ms.load(args.model, device=args.device)
    data = ioi_position_pairs(model, n=args.n_train + args.n_test, seed=args.seed)
    train, test = data.split(args.n_train)
    print(f"{args.model}: {len(train)} training and {len(test)} held-out IOI position-swap pairs")
    where = localise(model, test, not args.quiet)
    layer = where["layer"] if args.resid_layer is None else args.resid_layer
    print(f"unpatched logit difference (subject - indirect object): {where['unpatched']:.3f}")
    print("effect of patching the final token's residual stream, by layer:")
    print("  " + " ".join(f"{i}:{e:+.2f}" for i, e in enumerate(where["resid_effect"])))
    readers = [(hl, h) for hl, h, _ in where["heads"][: args.n_readers]]
    print(f"residual layer {layer}; heads reading it (largest effect of their query at the final token): "
          + ", ".join(f"{hl}.{h} ({e:+.2f})" for hl, h, e in where["heads"][: args.n_readers]))  # fmt: skip
    mlp_layers = args.mlp_layers or sorted({model.cfg.n_layers // 2, max(0, layer - 2)})
    sites = [(act_name("resid_pre", layer), head_readers(model, readers, "q"))]
    sites += [(act_name("post", m), None) for m in mlp_layers]
    config = DASConfig(d_sub=args.d_sub, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "func"}, "localisation": where, "sites": []}
    gen = torch.Generator().manual_seed(args.seed)
    for hook_name, site_readers in sites:
        sub = train_das(model, train, hook_name, -1, config, progress=not args.quiet)
        sub.save(out / hook_name)
        d_act = sub.basis.shape[0]
        random_dir = torch.randn(d_act, generator=gen)
        run = InterchangeRun(model, test, hook_name, -1)
        scores = {
            "das": interchange_scores(model, sub, test, run=run),
            "random direction": interchange_scores(model, random_dir, test, run=run),
            "whole activation": interchange_scores(model, torch.eye(d_act), test, run=run),
        }
        report = illusion_check(
            model, test.source_tokens, test.base_tokens, [sub.basis, random_dir], test.metric(), hook_name,
            readers=site_readers, names=["DAS direction", "random direction"], attention_mask=test.attention_mask,
        )  # fmt: skip
        report.save(out / f"{hook_name}.check.html")
        steps_per_s = config.steps / sub.seconds
        print(f"\n{hook_name}: DAS {config.steps} steps in {sub.seconds:.1f}s ({steps_per_s:.2f} steps/s), "
              f"loss {sub.losses[0]:.3f} -> {sub.losses[-1]:.3f}")  # fmt: skip
        print("| subspace | IIA | logit diff | recovered |\n|---|---|---|---|")
        for name, s in scores.items():
            print(f"| {name} | {s.iia:.2f} | {s.logit_diff:.3f} | {s.recovered:.2f} |")
        print(f"\nillusion check ({'W_Q of ' + str(readers) if site_readers is not None else 'W_out'}):")
        print(report.table())
        results["sites"].append({
            "hook_name": hook_name, "steps_per_s": steps_per_s, "losses": sub.losses,
            "scores": {k: vars(v) for k, v in scores.items()}, "check": report.to_dict(),
            "readers": readers if site_readers is not None else "W_out",
        })  # fmt: skip
    results["seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out / 'results.json'} and the checks' figures ({results['seconds']:.0f}s in all)")
    return 0


def cli_steer(args: argparse.Namespace) -> int:
    """``mechscope subspace steer``: generate with and without a mean-difference direction added.

    Example:
        >>> from mechscope.cli import build_parser
        >>> build_parser().parse_args(["subspace", "steer", "--coefficient", "4"]).coefficient
        4.0
    """
    import torch

    import mechscope as ms
    from mechscope.subspace import mean_difference, steer

    torch.set_num_threads(args.threads)
    model = ms.load(args.model, device=args.device)
    direction = mean_difference(model, args.positive, args.negative, args.hook)
    plain = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False, verbose=False)
    with steer(model, args.hook, direction, args.coefficient):
        steered = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False, verbose=False)
    print(f"direction: mean activation at {args.hook} of {args.positive!r} minus {args.negative!r} "
          f"(norm {float(direction.norm()):.2f}), coefficient {args.coefficient}")  # fmt: skip
    print(f"plain:   {plain!r}\nsteered: {steered!r}")
    return 0


def add_subspace_parser(
    sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
) -> None:
    """Register ``mechscope subspace ioi|steer`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_subspace_parser(parser.add_subparsers())
        >>> parser.parse_args(["subspace", "ioi", "--mlp-layers", "12", "20"]).mlp_layers
        [12, 20]
    """
    p = sub.add_parser(
        "subspace",
        help="DAS and the interpretability-illusion check on IOI; steering",
        description="Subspace interventions: DAS and the illusion check on IOI, steering a generation.",
        formatter_class=formatter_class,
    )
    add_subspace_commands(p.add_subparsers(dest="subspace", required=True, metavar="{ioi,steer}"), formatter_class)


def add_subspace_commands(kinds, formatter_class: type[argparse.HelpFormatter]) -> None:
    """Register ``ioi`` and ``steer`` on ``kinds`` (a subparsers object)."""
    ioi = kinds.add_parser(
        "ioi", help="DAS on the IOI name-position signal, with the illusion check",
        description=(__doc__ or "").split("\n\n")[1], formatter_class=formatter_class,
    )  # fmt: skip
    ioi.add_argument("--n-train", type=int, default=192, help="training pairs")
    ioi.add_argument("--n-test", type=int, default=64, help="held-out pairs (localisation, scores and the check)")
    ioi.add_argument("--steps", type=int, default=150, help="DAS optimiser steps per site")
    ioi.add_argument("--batch-size", type=int, default=32, help="pairs per DAS step")
    ioi.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate of the rotation")
    ioi.add_argument("--d-sub", type=int, default=1, help="dimension of the learned subspaces")
    ioi.add_argument("--resid-layer", type=int, default=None,
                     help="residual layer (resid_pre, final token); None: found by activation patching")  # fmt: skip
    ioi.add_argument("--mlp-layers", type=int, nargs="*", default=None,
                     help="MLP hidden layers (hook_post) to learn a direction in; None: the middle layer and the "
                          "residual layer minus 2")  # fmt: skip
    ioi.add_argument("--n-readers", type=int, default=3, help="heads whose queries count as the residual's readers")
    ioi.add_argument("--out-dir", default="mechscope-subspace", help="where results and figures are written")
    ioi.set_defaults(func=cli_ioi)
    st = kinds.add_parser("steer", help="generate with a mean-difference direction added",
                          description="Generate from a prompt with and without a steering direction.",
                          formatter_class=formatter_class)  # fmt: skip
    st.add_argument("--prompt", default="I think that this movie was", help="the prompt to continue")
    st.add_argument("--positive", nargs="+", default=["I hate it", "This is terrible", "What an awful day"],
                    help="prompts whose mean activation is the direction's head")  # fmt: skip
    st.add_argument("--negative", nargs="+", default=["I love it", "This is wonderful", "What a great day"],
                    help="prompts whose mean activation is subtracted")  # fmt: skip
    st.add_argument("--hook", default="blocks.10.hook_resid_post", help="where the direction is added")
    st.add_argument("--coefficient", type=float, default=1.5, help="multiple of the direction added")
    st.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate")
    st.set_defaults(func=cli_steer)
    for q in (ioi, st):
        q.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory, .gguf file or hub id")
        q.add_argument("--device", default=None, help="e.g. cpu or cuda (None: cuda when available)")
        q.add_argument("--seed", type=int, default=0, help="seed of the pairs, DAS and the random direction")
        q.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        q.add_argument("--quiet", action="store_true", help="no progress bars")

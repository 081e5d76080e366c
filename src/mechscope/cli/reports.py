"""Report assembly: the toys' HTML reports (with a JSON of their numbers) and the tour's IOI report."""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from pathlib import Path

import torch

from mechscope.cli.figures import heatmap_figure, line_figure, write_report
from mechscope.toys import fourier, induction, modular, superposition


def grokking_report(run: modular.GrokkingRun, path: str | Path, progress: bool = True, rule: str = "gap") -> dict:
    """Analyse a grokking run (Fourier structure, progress measures) and write its report; return the numbers.

    ``rule`` picks the key frequencies (`fourier.KEY_FREQUENCY_RULES`: ``"gap"``, the default, or
    ``"threshold"``); the progress measures use the key frequencies it picks.

    Example:
        >>> run = modular.train_grokking(modular.GrokkingConfig.quick())  # doctest: +SKIP
        >>> numbers = grokking_report(run, "grokking.html")  # doctest: +SKIP
    """
    cfg = run.config
    analysis = modular.analyse_model(run.model, run.data, cfg.p, rule=rule)
    key_freqs = analysis["key_freqs_neurons"] or analysis["key_freqs_embed"]
    measures = modular.progress_measures(run, key_freqs, progress=progress)
    grok = run.grokking_epoch()
    train_fit = next((h["epoch"] for h in run.history if h["train_acc"] >= 0.99), None)
    numbers = {
        "config": cfg.to_dict(),
        "epochs_trained": run.epoch,
        "train_acc_99_epoch": train_fit,
        "test_acc_99_epoch": grok,
        "final": run.history[-1],
        "key_freqs": key_freqs,
        **analysis,
        "progress_measures": measures,
        "history": run.history,
    }
    epochs = [h["epoch"] for h in run.history]
    ckpt = [m["epoch"] for m in measures]
    losses = line_figure(
        {"train loss": epochs, "test loss": epochs, "restricted loss": ckpt, "excluded loss": ckpt},
        {
            "train loss": [h["train_loss"] for h in run.history],
            "test loss": [h["test_loss"] for h in run.history],
            "restricted loss": [m["restricted_loss"] for m in measures],
            "excluded loss": [m["excluded_loss"] for m in measures],
        },
        "Losses and progress measures (key frequencies of the final model)",
        "epoch",
        log_y=True,
    )
    acc = line_figure(
        epochs,
        {
            "train accuracy": [h["train_acc"] for h in run.history],
            "test accuracy": [h["test_acc"] for h in run.history],
        },
        "Accuracy",
        "epoch",
    )
    weights = line_figure(
        ckpt, {"sum of squared weights": [m["sum_sq_weights"] for m in measures]}, "Total squared weight norm", "epoch"
    )
    share = line_figure(
        ckpt,
        {"embedding share in key frequencies": [m["embed_key_share"] for m in measures]},
        "Fraction of the embedding's Fourier norm in the key frequencies",
        "epoch",
    )
    freqs = list(range(1, cfg.p // 2 + 1))
    embed = line_figure(
        freqs,
        {"‖W_E‖² per frequency": analysis["embed_freq_norms"]},
        "Embedding norm per Fourier frequency (final model)",
        "frequency k",
    )
    order = sorted(range(cfg.d_mlp), key=lambda i: (analysis["neuron_freq"][i], -analysis["neuron_frac_explained"][i]))
    neurons = line_figure(
        list(range(cfg.d_mlp)),
        {
            "fraction explained": [analysis["neuron_frac_explained"][i] for i in order],
            "dominant frequency / (p/2)": [analysis["neuron_freq"][i] / (cfg.p // 2) for i in order],
        },
        "Neurons sorted by dominant frequency: variance fraction explained by it",
        "neuron (sorted)",
    )
    acts = modular.neuron_activations(run.model, run.data)
    power = fourier.fourier_2d(acts).pow(2).mean(-1)  # [p, p]: mean over neurons
    power[0, 0] = 0
    _, basis_labels = fourier.fourier_basis(cfg.p)
    title_2d = "Mean squared 2-D Fourier coefficient of the neurons (constant removed)"
    neurons_2d = heatmap_figure(
        power.tolist(),
        title_2d,
        x=basis_labels,
        y=basis_labels,
        colorscale="Blues",
        zmid=None,
        x_title="b",
        y_title="a",
    )
    summary = [
        f"p = {cfg.p}, {cfg.frac_train:.0%} of pairs for training, {run.epoch} epochs",
        f"train accuracy >= 99% at epoch {train_fit}; test accuracy >= 99% at epoch {grok}",
        f"key frequencies (neurons): {analysis['key_freqs_neurons']}; (embedding): {analysis['key_freqs_embed']}",
        f"mean fraction of variance explained by a neuron's key frequency: {analysis['frac_explained_by_key']:.3f}",
        (
            f"final train/test loss {run.history[-1]['train_loss']:.3g} / {run.history[-1]['test_loss']:.3g}; "
            f"restricted {measures[-1]['restricted_loss']:.3g}; excluded {measures[-1]['excluded_loss']:.3g}"
        ),
    ]
    sections = [
        ("Loss curves", losses),
        ("Accuracy", acc),
        ("Weight norm", weights),
        ("Embedding sparsity", share),
        ("Embedding in the Fourier basis", embed),
        ("Neuron frequencies", neurons),
        ("Neurons in the 2-D Fourier basis", neurons_2d),
    ]
    write_report(path, "Modular addition: grokking", sections, numbers, summary)
    return numbers


def superposition_report(
    n_features: int,
    n_hidden: int,
    n_instances: int,
    training: superposition.SuperpositionTraining,
    path,
    phase_training: superposition.SuperpositionTraining | None = None,
    progress: bool = True,
    state_dir: str | Path | None = None,
) -> dict:
    """Train the intro sweep (importance ``0.9^i``, density ``20^-t``), the phase diagram; write the report.

    With ``state_dir`` both trainings are resumable (``state_dir/intro`` and ``state_dir/phase``).

    Example:
        >>> numbers = superposition_report(5, 2, 8, superposition.SuperpositionTraining(), "sp.html")  # doctest: +SKIP
    """
    density = (20.0 ** -torch.linspace(0, 1, n_instances))[:, None]
    importance = 0.9 ** torch.arange(n_features, dtype=torch.float32)
    toy = superposition.ToyModel(n_features, n_hidden, n_instances, density, importance, seed=training.seed)
    state_dir = Path(state_dir) if state_dir is not None else None
    losses = superposition.train_toy_model(
        toy, training, progress=progress, out_dir=state_dir / "intro" if state_dir is not None else None
    )
    W = toy.W.detach()
    gram = torch.einsum("ihf,ihg->ifg", W, W)
    norms, interference = superposition.feature_norms(W), superposition.feature_superposition(W)
    dims = superposition.feature_dimensionality(W)
    diagram = superposition.phase_diagram(
        training=phase_training or training,
        progress=progress,
        out_dir=state_dir / "phase" if state_dir is not None else None,
    )
    labels = [f"1-S={d:.3g}" for d in density[:, 0].tolist()]
    numbers = {
        "n_features": n_features,
        "n_hidden": n_hidden,
        "training": dataclasses.asdict(training),
        "density": density[:, 0].tolist(),
        "importance": importance.tolist(),
        "final_loss": losses[-1],
        "feature_norms": norms.tolist(),
        "feature_superposition": interference.tolist(),
        "feature_dimensionality": dims.tolist(),
        "dimensions_per_feature": superposition.dimensions_per_feature(W).tolist(),
        "phase_diagram": {
            "densities": diagram.densities,
            "importances": diagram.importances,
            "phases": diagram.phases,
            "W": diagram.W.tolist(),
            "b": diagram.b.tolist(),
        },
    }
    sections = []
    for i in range(n_instances):
        sections.append((f"WᵀW, instance {i} ({labels[i]})", heatmap_figure(gram[i].tolist(), f"WᵀW ({labels[i]})")))
    sections.append(
        (
            "Feature norms ‖W_i‖",
            heatmap_figure(
                norms.tolist(), "‖W_i‖ per instance (rows) and feature", y=labels, colorscale="Blues", zmid=None
            ),
        )
    )
    sections.append(
        (
            "Superposition Σ_j (Ŵ_i·W_j)²",
            heatmap_figure(
                interference.tolist(),
                "interference per instance and feature (0 = dedicated)",
                y=labels,
                colorscale="Reds",
                zmid=None,
            ),
        )
    )
    sections.append(
        (
            "Feature dimensionality",
            heatmap_figure(dims.tolist(), "D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²", y=labels, colorscale="Viridis", zmid=None),
        )
    )
    inverse_density = (1 / density[:, 0]).tolist()
    scatter = line_figure(
        inverse_density,
        {"dimensions per feature": numbers["dimensions_per_feature"]},
        "Dimensions per feature (line) and each feature's D_i (points) against 1/(1-S)",
        "1/(1-S)",
    )
    scatter.add_scatter(
        x=[x for x in inverse_density for _ in range(n_features)], y=dims.flatten().tolist(), mode="markers", name="D_i"
    )
    scatter.update_xaxes(type="log")
    sections.append(("Dimensionality against sparsity", scatter))
    code = {p: i for i, p in enumerate(superposition.PHASES)}
    sections.append(
        (
            "Phase diagram (2 features, 1 dimension)",
            heatmap_figure(
                [[code[p] for p in row] for row in diagram.phases],
                "0 = not represented, 1 = dedicated, 2 = superposition",
                x=[f"{v:.3g}" for v in diagram.importances],
                y=[f"{v:.3g}" for v in diagram.densities],
                colorscale="Viridis",
                zmid=None,
                x_title="relative importance of feature 2",
                y_title="feature density 1-S",
            ),
        )
    )
    sections.append(
        (
            "Phase table",
            "\n".join(
                f"1-S={d:<7.3g} " + " ".join(f"{p.split()[0][:5]:>6}" for p in row)
                for d, row in zip(diagram.densities, diagram.phases, strict=True)
            ),
        )
    )
    summary = [
        f"{n_instances} instances of {n_features} features in {n_hidden} dimensions, {training.steps} steps",
        f"dimensions per feature: {[round(v, 3) for v in numbers['dimensions_per_feature']]}",
    ]
    write_report(path, "Toy models of superposition", sections, numbers, summary)
    return numbers


def induction_report(run: induction.InductionRun, path) -> dict:
    """Score the heads of a trained induction toy and write its report; return the numbers.

    Example:
        >>> numbers = induction_report(induction.train_induction(), "induction.html")  # doctest: +SKIP
    """
    numbers = {**induction.induction_summary(run), "history": run.history}
    steps = [h["step"] for h in run.history]
    tokens = induction.repeated_tokens(run.config.d_vocab, run.config.seq_len // 2, 1, seed=7)
    _, cache = run.model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    (l0, h0), (l1, h1) = numbers["previous_token_head"], numbers["induction_head"]
    sections = [
        (
            "Loss",
            line_figure(
                steps,
                {
                    "loss (all positions)": [h["loss"] for h in run.history],
                    "loss (repeated span)": [h["induction_loss"] for h in run.history],
                },
                "Training loss",
                "step",
            ),
        ),
        (
            "Previous-token scores",
            heatmap_figure(
                numbers["previous_token_scores"],
                "layer × head",
                colorscale="Blues",
                zmid=None,
                x_title="head",
                y_title="layer",
            ),
        ),
        (
            "Induction scores",
            heatmap_figure(
                numbers["induction_scores"],
                "layer × head",
                colorscale="Blues",
                zmid=None,
                x_title="head",
                y_title="layer",
            ),
        ),
        (
            "K-composition",
            heatmap_figure(
                numbers["k_composition"],
                f"layer-0 head (rows) → layer-{l1} head (columns)",
                colorscale="Blues",
                zmid=None,
                x_title=f"layer-{l1} head",
                y_title="layer-0 head",
            ),
        ),
        (
            "K-composition by ablation",
            heatmap_figure(
                numbers["k_composition_ablation"],
                "fall in the induction score when the row head is mean-ablated in the column head's keys",
                colorscale="Blues",
                zmid=None,
                x_title=f"layer-{l1} head",
                y_title="layer-0 head",
            ),
        ),
        (
            f"Attention of head {l0}.{h0}",
            heatmap_figure(cache["pattern", l0][0, h0].tolist(), "previous-token head", colorscale="Blues", zmid=None),
        ),
        (
            f"Attention of head {l1}.{h1}",
            heatmap_figure(cache["pattern", l1][0, h1].tolist(), "induction head", colorscale="Blues", zmid=None),
        ),
    ]
    summary = [
        numbers["verdict"],
        (
            f"loss on repeated half {numbers['second_half_loss']:.3f} vs chance {numbers['chance_loss']:.3f} "
            f"(first half {numbers['first_half_loss']:.3f})"
        ),
        (
            f"previous-token head {l0}.{h0} (tied within two standard errors: {numbers['top_previous_token_heads']}; "
            f"at least half its score: {numbers['previous_token_heads']}), induction head {l1}.{h1} (tied: "
            f"{numbers['top_induction_heads']}; at least half its score: {numbers['induction_heads']})"
        ),
        (
            f"highest K-composition pair {numbers['k_composition_best_pair']}: the detected pair "
            f"{numbers['detected_pair_has_highest_k_composition']}; a pair of top heads "
            f"{numbers['highest_k_composition_is_top_pair']}; a previous-token head into an induction head "
            f"{numbers['highest_k_composition_is_previous_token_to_induction']}"
        ),
        (
            f"each induction head's most K-composed layer-0 head is a previous-token head: by weights "
            f"{numbers['each_induction_head_composes_most_with_a_previous_token_head']}, by ablation "
            f"{numbers['each_induction_head_depends_most_on_a_previous_token_head']}"
        ),
    ]
    write_report(path, "Induction heads in a 2-layer attention-only transformer", sections, numbers, summary)
    return numbers


def ioi_report(
    out_dir: str | Path,
    model_name: str,
    data,
    str_tokens: Sequence[str],
    resid: torch.Tensor,
    resid_layers: Sequence[int],
    heads: torch.Tensor,
    rows: Sequence[tuple[str, float, float, float]],
) -> tuple[Path, list[Path | None]]:
    """Write ``ioi_patching.html`` (both heatmaps and the AtP* table) and the heatmaps as PNG files.

    ``resid`` is ``[layer, pos]`` for ``resid_layers``, ``heads`` is ``[layer, head]``; ``rows`` are
    ``(head label, AtP* estimate, exact effect, patched metric)``. Returns the report and the PNGs
    (``None`` where no PNG backend could run).

    Example:
        >>> import tempfile, types
        >>> data = types.SimpleNamespace(clean_prompts=["a b"], corrupted_prompts=["a c"])
        >>> path, pngs = ioi_report(tempfile.mkdtemp(), "toy", data, [" a", " b"], torch.zeros(1, 2),
        ...                         [0], torch.zeros(1, 2), [("L0H1", 0.5, 0.4, 0.6)])
        >>> path.name, "<td>L0H1</td>" in path.read_text()
        ('ioi_patching.html', True)
    """
    from mechscope.viz.heatmap import layer_head_heatmap, layer_pos_heatmap, save_heatmaps, save_png

    figures = [
        layer_pos_heatmap(
            resid,
            str_tokens,
            "Residual stream (resid_pre), denoising: normalised logit difference",
            "metric",
            resid_layers,
        ),
        layer_head_heatmap(heads, "Head outputs (z, all positions), denoising: normalised logit difference", "metric"),
    ]
    cells = [
        f"<tr><td>{label}</td>" + "".join(f"<td>{v:.3f}</td>" for v in values) + "</tr>" for label, *values in rows
    ]
    table = (
        f"<h3>AtP* top {len(rows)} heads (change of the normalised metric; exact = verified patch, "
        "patched metric = the exhaustive sweep)</h3><table><tr><th>head</th><th>AtP* estimate</th><th>exact effect</th>"
        f"<th>patched metric</th></tr>{''.join(cells)}</table>"
    )
    intro = (
        f"<p>{html.escape(model_name)}: {len(data.clean_prompts)} IOI prompts of {len(str_tokens)} tokens, for example "
        f"<code>{html.escape(data.clean_prompts[0])}</code> (corrupted: <code>{html.escape(data.corrupted_prompts[0])}"
        "</code>). 0 = corrupted run, 1 = clean run.</p>"
    )
    path = save_heatmaps(figures, Path(out_dir) / "ioi_patching.html", "IOI patching", intro, ["", table])
    pngs = [
        save_png(fig, Path(out_dir) / f"ioi_{name}.png") for fig, name in zip(figures, ("resid", "heads"), strict=True)
    ]
    return path, pngs

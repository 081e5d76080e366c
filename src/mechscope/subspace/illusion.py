"""The interpretability-illusion check for subspace patching (Makelov, Lange and Nanda, 2023).

Patching an activation along a subspace can change the output through a path the model never
uses: the subspace combines a *causally disconnected* part, which varies with the feature but
lies in the kernel of the weights that read the activation, and a *dormant* part, which those
weights read but which does not vary on the data. Patching the sum moves the dormant part by the
disconnected part's variation, and the model's output follows.

`illusion_check` splits each subspace into its component in the row space of the downstream
weights (what they read: ``W_out`` for an MLP's hidden layer ``hook_post``; for the residual
stream, the weights of the readers you name, e.g. `head_readers` of the name-mover heads'
queries) and its component in their kernel, and measures (a) the variance of the activations
along each part over the data and (b) the patching effect of each part alone and of the whole.
A subspace is flagged *illusory* when its effect is large and needs both parts: neither the
row-space part nor the kernel part alone gives ``threshold`` of it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, InputError
from mechscope.names import layer_of, parse_act_name
from mechscope.patching.activation import Direction, activation_patch, base_and_source
from mechscope.patching.metrics import Metric
from mechscope.subspace.basis import Directions, as_bases, split_subspace
from mechscope.subspace.intervention import check_hook
from mechscope.subspace.patch import subspace_patch


@dataclass(frozen=True)
class IllusionRow:
    """The check's numbers for one subspace. Effects are mean changes of the metric from the
    unpatched run; variances are summed over the part's dimensions (activations of the clean and
    corrupted prompts at the patched position). ``row_fraction``: how much of the subspace
    lies in the row space (mean squared norm of its basis vectors' row-space components).

    Example:
        >>> from mechscope.subspace.toy import ILLUSORY_DIRECTION, TOY_HOOK, illusion_toy, toy_pairs
        >>> toy, pairs = illusion_toy(), toy_pairs(32)  # the paper's hand-built illusion
        >>> clean, corrupted = pairs.source_tokens, pairs.base_tokens
        >>> report = illusion_check(toy, clean, corrupted, [ILLUSORY_DIRECTION], pairs.metric(), TOY_HOOK)
        >>> row = report.rows[0]  # a large effect that neither part gives alone
        >>> round(row.effect, 2), row.effect_row, row.effect_kernel, row.illusory
        (11.31, 0.0, 0.0, True)
    """

    name: str
    effect: float
    effect_row: float
    effect_kernel: float
    variance: float
    variance_row: float
    variance_kernel: float
    row_fraction: float
    illusory: bool
    verdict: str


@dataclass(frozen=True)
class IllusionReport:
    """`illusion_check`'s result: one `IllusionRow` per subspace, the metric of the unpatched run,
    the effect of patching the whole activation, the mean variance per dimension of the
    activation (a random direction's expected variance) and the thresholds used.

    Example:
        >>> from mechscope.subspace.toy import ILLUSORY_DIRECTION, TOY_HOOK, illusion_toy, toy_pairs
        >>> toy, pairs = illusion_toy(), toy_pairs(32)
        >>> clean, corrupted = pairs.source_tokens, pairs.base_tokens
        >>> report = illusion_check(toy, clean, corrupted, [ILLUSORY_DIRECTION], pairs.metric(), TOY_HOOK)
        >>> report.unpatched, report.effect_full  # patching the whole hidden layer changes nothing
        (-2.0, 0.0)
        >>> [row.verdict.split(":")[0] for row in report.rows]
        ['illusory']
    """

    rows: list[IllusionRow]
    hook_name: str
    position: int
    unpatched: float
    effect_full: float
    variance_per_dim: float
    threshold: float
    min_effect: float

    def table(self) -> str:
        """The rows as a Markdown table.

        Example:
            >>> row = IllusionRow("v", 2.0, 0.1, 0.0, 1.0, 0.0, 1.0, 0.5, True, "illusory")
            >>> print(IllusionReport([row], "blocks.0.mlp.hook_post", -1, -2.0, 0.0, 0.25, 0.5, 0.1).table())
            | subspace | effect | row-space part | kernel part | variance (row / kernel) | in row space | verdict |
            |---|---|---|---|---|---|---|
            | v | 2 | 0.1 | 0 | 0 / 1 | 50% | illusory |
        """
        head = "| subspace | effect | row-space part | kernel part | variance (row / kernel) | in row space | verdict |"
        lines = [head, "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {r.effect:.3g} | {r.effect_row:.3g} | {r.effect_kernel:.3g} | "
                f"{r.variance_row:.3g} / {r.variance_kernel:.3g} | {r.row_fraction:.0%} | {r.verdict} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain numbers, for JSON."""
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}

    def effects(self) -> Float[Tensor, "direction 3"]:
        """Effects ``[n_subspaces, 3]``: whole subspace, row-space part, kernel part."""
        return torch.tensor([[r.effect, r.effect_row, r.effect_kernel] for r in self.rows])

    def variances(self) -> Float[Tensor, "direction 3"]:
        """Variances ``[n_subspaces, 3]`` along the whole subspace, its row-space part and its kernel part."""
        return torch.tensor([[r.variance, r.variance_row, r.variance_kernel] for r in self.rows])

    def save(self, path: str | Path, png: bool = True) -> list[Path]:
        """Write the table and figures as HTML at ``path`` (PNGs beside it with ``png``) and the
        numbers as ``{stem}.json``; returns the paths written.

        Example:
            >>> import tempfile, pathlib
            >>> row = IllusionRow("v", 2.0, 0.1, 0.0, 1.0, 0.0, 1.0, 0.5, True, "illusory")
            >>> report = IllusionReport([row], "blocks.0.mlp.hook_post", -1, -2.0, 0.0, 0.25, 0.5, 0.1)
            >>> [p.suffix for p in report.save(pathlib.Path(tempfile.mkdtemp()) / "check.html", png=False)]
            ['.html', '.json']
        """
        from mechscope.viz.subspace import save_illusion_figures

        path = Path(path)
        names = [r.name for r in self.rows]
        intro = (
            f"<p>{html.escape(self.hook_name)}, position {self.position}; unpatched metric {self.unpatched:.4g}, "
            f"effect of patching the whole activation {self.effect_full:.4g}.</p>\n{self.table_html()}"
        )
        title = f"illusion check at {self.hook_name}"
        written = save_illusion_figures(names, self.effects(), self.variances(), path, title, intro, png)
        out = path.with_suffix(".json")
        out.write_text(json.dumps(self.to_dict(), indent=1))
        return [*written, out]

    def table_html(self) -> str:
        """The rows as an HTML table (escaped)."""
        head = "".join(
            f"<th>{h}</th>"
            for h in (
                "subspace",
                "effect",
                "row-space part",
                "kernel part",
                "variance row",
                "variance kernel",
                "in row space",
                "verdict",
            )
        )
        body = "".join(
            f"<tr><td>{html.escape(r.name)}</td><td>{r.effect:.3g}</td><td>{r.effect_row:.3g}</td>"
            f"<td>{r.effect_kernel:.3g}</td><td>{r.variance_row:.3g}</td><td>{r.variance_kernel:.3g}</td>"
            f"<td>{r.row_fraction:.0%}</td><td>{html.escape(r.verdict)}</td></tr>"
            for r in self.rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"


def span(matrix: Float[Tensor, "d_act n"], tol: float = 1e-4) -> Float[Tensor, "d_act k"]:
    """Orthonormal columns spanning the columns of ``matrix`` (singular values above ``tol`` times
    the norm of a unit column; none when the part is absent).

    Example:
        >>> span(torch.tensor([[1.0, 2.0], [0.0, 0.0]])).abs()
        tensor([[1.],
                [0.]])
    """
    u, s, _ = torch.linalg.svd(matrix.float(), full_matrices=False)
    return u[:, s > tol]


def head_readers(model, heads: Sequence[tuple[int, int]], kind: str = "q") -> Float[Tensor, "d_model d_read"]:
    """The residual-stream directions that heads read: ``W_Q`` (``kind="q"``, or ``W_K``/``W_V``)
    of each ``(layer, head)``, through the weight of the norm before attention (and, for
    LayerNorm, its centring), side by side ``[d_model, len(heads) * d_head]``.

    Example:
        >>> head_readers(model, [(2, 0), (2, 3)]).shape
        torch.Size([32, 16])
    """
    weights = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}
    if kind not in weights:
        raise InputError(f"kind must be 'q', 'k' or 'v', got {kind!r}")
    stacked = weights[kind].detach()
    d_model = model.cfg.d_model
    parts = []
    for layer, head in heads:
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < stacked.shape[1]):
            raise InputError(
                f"no head ({layer}, {head}): layers 0..{model.cfg.n_layers - 1}, heads 0..{stacked.shape[1] - 1}"
            )
        w = stacked[layer, head]
        norm = model.blocks[layer].ln1
        if norm is not None:
            w = w if norm.w is None else norm.w.detach()[:, None] * w
            if model.cfg.normalization_type in ("LN", "LNPre"):
                w = (torch.eye(d_model, device=w.device) - 1 / d_model) @ w
        parts.append(w)
    if not parts:
        raise InputError("name at least one (layer, head) whose input to read")
    return torch.cat(parts, dim=1)


def share(part: float, whole: float) -> str:
    """``part / whole`` as a whole percentage (no ``-0%`` for rounding noise).

    Example:
        >>> share(-1e-7, 1.2), share(0.5, 1.0)
        ('0%', '50%')
    """
    return f"{round(part / whole, 2) + 0.0:.0%}"


def default_readers(model, hook_name: str) -> Tensor:
    """``W_out`` of the layer for an MLP hidden activation; other sites need explicit readers."""
    kind, layer = parse_act_name(hook_name).kind, layer_of(hook_name)
    if kind == "post":
        return model.W_out[layer].detach()
    raise ConfigError(
        f"which weights read {hook_name!r} depends on the question; pass readers=[d_act, d_read], e.g. "
        "head_readers(model, [(layer, head), ...]) for the queries of the heads that should read it"
    )


def illusion_check(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    subspaces: Directions,
    metric: Metric,
    hook_name: str,
    position: int = -1,
    *,
    readers: Tensor | None = None,
    names: Sequence[str] | None = None,
    direction: Direction = "denoising",
    threshold: float = 0.5,
    min_effect: float = 0.1,
    attention_mask: Tensor | None = None,
    **sweep,
) -> IllusionReport:
    """Check each subspace (see `as_bases` for the forms) at ``hook_name``/``position`` for the
    interpretability illusion (module docstring). Patching runs on the batched engine.

    ``readers`` ``[d_act, d_read]`` are the downstream weights (default: ``W_out`` for
    ``hook_post``). A subspace's effect is large when it moves the metric by at least
    ``min_effect`` times the unpatched metric's magnitude; it is illusory when it is large and
    neither part alone reaches ``threshold`` of it.

    Example:
        >>> from mechscope.subspace.toy import illusion_toy, toy_pairs, ILLUSORY_DIRECTION, GENUINE_DIRECTION, TOY_HOOK
        >>> toy, data = illusion_toy(), toy_pairs(8)
        >>> report = illusion_check(toy, data.source_tokens, data.base_tokens, [ILLUSORY_DIRECTION, GENUINE_DIRECTION],
        ...                         data.metric(), TOY_HOOK, names=["planted", "unused"])
        >>> [(r.name, r.illusory) for r in report.rows]
        [('planted', True), ('unused', False)]
    """
    if not 0 < threshold <= 1 or min_effect < 0:
        raise InputError(f"threshold must be in (0, 1] and min_effect >= 0, got {threshold}, {min_effect}")
    check_hook(model, hook_name)
    kind, layer = parse_act_name(hook_name).kind, layer_of(hook_name)
    base_tokens, source_tokens = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    both_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
    with torch.no_grad():
        _, cache = model.run_with_cache(
            torch.cat((base_tokens, source_tokens)), names_filter=[hook_name], attention_mask=both_mask
        )
    acts = cache[hook_name][:, position].float()  # [2 * n_prompts, d_act]
    d_act = acts.shape[-1]
    bases = as_bases(subspaces, d_act)
    readers = default_readers(model, hook_name) if readers is None else readers.detach()
    names = [f"subspace {i}" for i in range(len(bases))] if names is None else list(names)
    if len(names) != len(bases):
        raise InputError(f"{len(names)} names for {len(bases)} subspaces")
    parts, slots = [], []  # every basis to patch; per subspace, the slots of (whole, row, kernel)
    row_fractions = []
    for basis in bases:
        basis = basis[:, basis.ne(0).any(0)].float()
        row, kernel = split_subspace(basis, readers.to(basis.device))
        row_fractions.append(float((row.norm(dim=0) ** 2).mean()))
        slot = []
        for part in (basis, span(row), span(kernel)):
            slot.append(len(parts) if part.shape[1] else None)
            if part.shape[1]:
                parts.append(part)
        slots.append(slot)
    sweep_args = dict(layers=[layer], positions=[position], direction=direction, attention_mask=attention_mask)
    effects = subspace_patch(
        model, clean_tokens, corrupted_tokens, parts, metric, kind, ("pos",), **sweep_args, **sweep
    )
    effects = effects.flatten()
    with torch.no_grad():
        unpatched = float(metric(model(base_tokens, attention_mask=attention_mask)).float().mean())
    full = activation_patch(
        model, clean_tokens, corrupted_tokens, metric, kind, ("pos",), direction=direction,
        patches=[[layer, position % base_tokens.shape[1]]], attention_mask=attention_mask,
    )  # fmt: skip
    centred = acts - acts.mean(0)
    total_var = float(centred.var(0, unbiased=False).sum())

    def variance(i: int | None) -> float:
        return 0.0 if i is None else float((centred @ parts[i]).var(0, unbiased=False).sum())

    def effect(i: int | None) -> float:
        return 0.0 if i is None else float(effects[i]) - unpatched

    rows = []
    for name, (whole, row, kernel), fraction in zip(names, slots, row_fractions, strict=True):
        e, e_row, e_ker = effect(whole), effect(row), effect(kernel)
        large = abs(e) >= min_effect * abs(unpatched) and abs(e) > 0
        needs_both = large and max(abs(e_row), abs(e_ker)) < threshold * abs(e)
        if not large:
            verdict = "small effect"
        elif needs_both:
            verdict = (
                f"illusory: row-space part alone {share(e_row, e)}, kernel part alone {share(e_ker, e)} of the effect"
            )
        else:
            alone = "row-space" if abs(e_row) >= abs(e_ker) else "kernel"
            verdict = f"not illusory: the {alone} part alone gives {share(max(e_row, e_ker, key=abs), e)} of the effect"
        rows.append(IllusionRow(name, e, e_row, e_ker, variance(whole), variance(row), variance(kernel), fraction,
                                needs_both, verdict))  # fmt: skip
    return IllusionReport(rows, hook_name, position, unpatched, float(full.flatten()[0]) - unpatched,
                          total_var / d_act, threshold, min_effect)  # fmt: skip

"""Evaluating an SAE on real text: reconstruction, sparsity, downstream loss and the error pathology.

All figures are pooled over every evaluated token (sums accumulated batch by batch):

* ``l0``: mean number of active latents per token; ``mse``: mean squared error per element;
  ``fvu``: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``; ``cosine``: mean cosine(x_hat, x);
  ``l2_ratio``: mean ``||x_hat|| / ||x||`` (shrinkage below 1); ``relative_reconstruction_bias``:
  ``E[||x_hat||^2] / E[x_hat . x]`` (1 is unbiased, below 1 is shrinkage).
* ``ce_clean``, ``ce_spliced``, ``ce_zero_ablation``, ``ce_mean_ablation`` and
  ``ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (also against mean ablation);
  ``kl_spliced``: mean KL(clean || spliced) of the next-token distributions.
* ``dead_fraction`` (never fired), ``dense_fraction`` (fired on more than ``dense_threshold`` of
  tokens) and ``density_histogram`` (counts of log10 firing densities).
* The pathology check of Gurnee (2024), "SAE reconstruction errors are (empirically)
  pathological": ``ce_random_perturbation`` replaces the SAE error with a random direction of the
  same norm at every token; ``pathology_ratio = (ce_spliced - ce_clean) / (ce_random - ce_clean)``
  (well above 1 means the SAE error hurts more than a random error of its size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.sae.base import SAE
from mechscope.sae.splice import splice, spliced_output


@dataclass
class SAEEvaluation:
    """The numbers `evaluate_sae` returns (see the module docstring for definitions).

    Example:
        >>> from mechscope.sae import SAEConfig, evaluate_sae, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post"))
        >>> result = evaluate_sae(model, sae, torch.randint(0, 50, (4, 8)))
        >>> result.n_tokens, result.l0  # a TopK SAE keeps exactly k latents per token
        (32, 4.0)
        >>> result.ce_spliced > 0 and 0 <= result.dead_fraction <= 1, "ce_loss_recovered" in result.to_dict()
        (True, True)
    """

    n_tokens: int
    l0: float
    mse: float
    fvu: float
    cosine: float
    l2_ratio: float
    relative_reconstruction_bias: float
    dead_fraction: float
    dense_fraction: float
    ce_clean: float | None = None
    ce_spliced: float | None = None
    ce_zero_ablation: float | None = None
    ce_mean_ablation: float | None = None
    ce_loss_recovered: float | None = None
    ce_loss_recovered_vs_mean: float | None = None
    kl_spliced: float | None = None
    ce_random_perturbation: float | None = None
    kl_random_perturbation: float | None = None
    pathology_ratio: float | None = None
    density_histogram: dict[str, list[float]] = field(default_factory=dict)
    feature_density: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """Every number as plain values (what the evaluation's JSON holds)."""
        return asdict(self)

    def summary(self) -> str:
        """One line per figure, for logs and the CLI."""
        lines = []
        for key, value in self.to_dict().items():
            if key in ("density_histogram", "feature_density") or value is None:
                continue
            lines.append(f"{key:<28} {value:.4f}" if isinstance(value, float) else f"{key:<28} {value}")
        return "\n".join(lines)


def _ce_and_logprobs(logits: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    logprobs = logits[:, :-1].float().log_softmax(-1)
    ce = -logprobs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return ce, logprobs


def _kl(clean: Tensor, other: Tensor) -> Tensor:
    return (clean.exp() * (clean - other)).sum(-1)


@torch.no_grad()
def evaluate_sae(
    model,
    sae: SAE,
    tokens: Int[Tensor, "batch pos"],
    *,
    batch_size: int = 8,
    skip_first_position: bool | None = None,
    compute_ce: bool = True,
    dense_threshold: float = 0.1,
    seed: int = 0,
) -> SAEEvaluation:
    """Evaluate ``sae`` on the sequences ``tokens [n_seq, pos]`` of ``model``.

    ``skip_first_position`` (default: when the sequences start with BOS) leaves the first position
    out of the reconstruction statistics. The loss figures use every next-token prediction.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> result = evaluate_sae(model, sae, torch.randint(0, 50, (4, 8)))
        >>> 0 <= result.dead_fraction <= 1 and result.ce_clean > 0
        True
    """
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise InputError(f"tokens must be [n_seq, pos] with at least one sequence, got {tuple(tokens.shape)}")
    cfg = sae.cfg
    if skip_first_position is None:
        bos = getattr(getattr(model, "codec", None), "bos_token_id", None)
        skip_first_position = bos is not None and bool((tokens[:, 0] == bos).all())
    skip = 1 if skip_first_position else 0
    sae = sae.to(model.device).eval()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums: dict[str, float] = dict.fromkeys(
        ["n", "active", "sq_err", "sq_norm", "cos", "l2_ratio", "dot", "recons_sq", "ce_clean", "ce_spliced",
         "ce_zero", "kl_spliced", "ce_random", "kl_random", "n_pred"], 0.0)  # fmt: skip
    sum_x = torch.zeros(cfg.d_out, dtype=torch.float64)
    fired = torch.zeros(cfg.d_sae, dtype=torch.float64)
    out_sum: Tensor | None = None
    batches = [tokens[i : i + batch_size].to(model.device) for i in range(0, tokens.shape[0], batch_size)]

    for batch in batches:
        _, cache = model.run_with_cache(batch, names_filter=list({cfg.hook_name, cfg.output_hook}))
        x_in, act_out = cache[cfg.hook_name], cache[cfg.output_hook]
        acts = sae.encode(x_in)
        recons = sae.decode(acts, x_in if sae.W_skip is not None else None)
        target = sae.flatten_input(act_out) if not cfg.is_transcoder else act_out.to(recons.dtype)
        acts, recons, target = acts[:, skip:], recons[:, skip:], target[:, skip:]
        x, xh = target.reshape(-1, cfg.d_out).double(), recons.reshape(-1, cfg.d_out).double()
        sums["n"] += x.shape[0]
        sums["active"] += float((acts != 0).sum())
        sums["sq_err"] += float((x - xh).pow(2).sum())
        sums["sq_norm"] += float(x.pow(2).sum())
        sum_x += x.sum(0).cpu()
        sums["cos"] += float(torch.nn.functional.cosine_similarity(xh, x, dim=-1).sum())
        sums["l2_ratio"] += float((xh.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-12)).sum())
        sums["dot"] += float((xh * x).sum())
        sums["recons_sq"] += float(xh.pow(2).sum())
        fired += (acts != 0).reshape(-1, cfg.d_sae).sum(0).double().cpu()
        batch_out = act_out.double().sum((0, 1))
        out_sum = batch_out if out_sum is None else out_sum + batch_out
        if not compute_ce:
            continue
        clean_ce, clean_lp = _ce_and_logprobs(model(batch), batch)
        with splice(model, sae):
            spliced_ce, spliced_lp = _ce_and_logprobs(model(batch), batch)

        def zero(act, *, hook):
            return torch.zeros_like(act)

        zero_ce, _ = _ce_and_logprobs(model.run_with_hooks(batch, fwd_hooks=[(cfg.output_hook, zero)]), batch)

        def perturb(act, *, hook, source=x_in):
            error = act.reshape(*act.shape[:2], -1) - spliced_output(sae, act, source, False).reshape(
                *act.shape[:2], -1
            )
            noise = torch.randn(error.shape, generator=gen).to(error)
            noise = noise / noise.norm(dim=-1, keepdim=True) * error.norm(dim=-1, keepdim=True)
            return (act.reshape(noise.shape) + noise).reshape(act.shape)

        random_ce, random_lp = _ce_and_logprobs(
            model.run_with_hooks(batch, fwd_hooks=[(cfg.output_hook, perturb)]), batch
        )
        sums["n_pred"] += clean_ce.numel()
        sums["ce_clean"] += float(clean_ce.sum())
        sums["ce_spliced"] += float(spliced_ce.sum())
        sums["ce_zero"] += float(zero_ce.sum())
        sums["ce_random"] += float(random_ce.sum())
        sums["kl_spliced"] += float(_kl(clean_lp, spliced_lp).sum())
        sums["kl_random"] += float(_kl(clean_lp, random_lp).sum())

    n = sums["n"]
    variance = sums["sq_norm"] - float(sum_x.pow(2).sum()) / n
    density = fired / n
    log_density = torch.log10(density.clamp_min(1e-10))
    edges = torch.linspace(-10, 0, 21)
    counts = torch.histc(log_density.float(), bins=20, min=-10, max=0)
    result = SAEEvaluation(
        n_tokens=int(n),
        l0=sums["active"] / n,
        mse=sums["sq_err"] / (n * cfg.d_out),
        fvu=sums["sq_err"] / max(variance, 1e-12),
        cosine=sums["cos"] / n,
        l2_ratio=sums["l2_ratio"] / n,
        relative_reconstruction_bias=sums["recons_sq"] / max(sums["dot"], 1e-12),
        dead_fraction=float((fired == 0).double().mean()),
        dense_fraction=float((density > dense_threshold).double().mean()),
        density_histogram={"log10_density_edges": edges.tolist(), "counts": counts.tolist()},
        feature_density=density.tolist(),
    )
    if compute_ce:
        mean_out = (out_sum / (tokens.shape[0] * tokens.shape[1])).to(model.dtype)
        mean_ce_sum = 0.0
        for batch in batches:

            def mean_ablate(act, *, hook):
                return mean_out.expand_as(act).clone()

            logits = model.run_with_hooks(batch, fwd_hooks=[(cfg.output_hook, mean_ablate)])
            mean_ce_sum += float(_ce_and_logprobs(logits, batch)[0].sum())
        m = sums["n_pred"]
        result.ce_clean, result.ce_spliced = sums["ce_clean"] / m, sums["ce_spliced"] / m
        result.ce_zero_ablation, result.ce_mean_ablation = sums["ce_zero"] / m, mean_ce_sum / m
        result.kl_spliced = sums["kl_spliced"] / m
        result.ce_random_perturbation, result.kl_random_perturbation = sums["ce_random"] / m, sums["kl_random"] / m
        result.ce_loss_recovered = _recovered(result.ce_zero_ablation, result.ce_spliced, result.ce_clean)
        result.ce_loss_recovered_vs_mean = _recovered(result.ce_mean_ablation, result.ce_spliced, result.ce_clean)
        random_gap = result.ce_random_perturbation - result.ce_clean
        result.pathology_ratio = (result.ce_spliced - result.ce_clean) / random_gap if abs(random_gap) > 1e-12 else None
    return result


def _recovered(ablated: float, spliced: float, clean: float) -> float | None:
    gap = ablated - clean
    return (ablated - spliced) / gap if abs(gap) > 1e-12 else None

"""Weight processing that leaves the model's log-probabilities unchanged but simplifies its weights.

All four steps are off by default, so activations equal those of ``transformers``. Each step is
exact (up to float rounding) for the models it accepts and raises `ConfigError` otherwise:

- ``fold_ln``: multiply each pre-norm's weight (and add its bias) into the weights that read
  the norm's output (``w_q``/``w_k``/``w_v``, ``w_in``/``w_gate``, ``w_u``); the pre-norms
  (``ln1``, ``ln2``, ``ln_final``) then only centre (LayerNorm) and scale, have no weight
  parameters, and ``cfg.normalization_type`` becomes ``"LNPre"``/``"RMSPre"``, as in TransformerLens. After a LayerNorm
  the readers ``w_q``/``w_k``/``w_v``, ``w_in`` and ``w_u`` are also centred over ``d_model``
  (its output has mean zero there), as in TransformerLens. Post-norms and QK-norms stay as
  they are, since nothing linear reads them before the residual stream or RoPE.
- ``center_writing_weights``: remove the mean over ``d_model`` from every weight writing to the
  residual stream (``W_E``, ``W_pos``, ``w_o``/``b_o``, ``w_out``/``b_out``). LayerNorm models
  only: every reader centres first. RMSNorm does not centre, so it is refused there.
- ``center_unembed``: remove the mean over the vocabulary from ``w_u`` (and ``b_U``); softmax
  ignores a shift. Refused with final-logit soft-capping, which does not.
- ``fold_value_biases``: move the value biases into ``b_o`` (each pattern row sums to one, so a
  value bias adds a constant ``W_O`` image); ``hook_z`` then excludes them. A no-op without them.

Folding or centring an unembedding tied to the embedding unties them first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from mechscope.errors import ConfigError
from mechscope.model.config import ModelConfig

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer

STEPS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


def unsupported_steps(cfg: ModelConfig) -> dict[str, str]:
    """Each processing step this architecture cannot take, with the reason.

    Example:
        >>> unsupported_steps(model.cfg)
        {}
        >>> list(unsupported_steps(ModelConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, d_vocab=5, n_ctx=4,
        ...                                    normalization_type="RMS")))
        ['center_writing_weights']
    """
    reasons = {}
    if cfg.normalization_type is None:
        reasons["fold_ln"] = "the model has no norms to fold"
    elif cfg.normalization_type.endswith("Pre"):
        reasons["fold_ln"] = f"the norms are already folded (normalization_type={cfg.normalization_type!r})"
    if cfg.normalization_type not in ("LN", "LNPre") or not cfg.pre_norm or cfg.post_norm:
        reasons["center_writing_weights"] = (
            "it is exact only when every reader of the residual stream is a LayerNorm that centres its "
            f"input; this model uses {cfg.normalization_type} with pre_norm={cfg.pre_norm}, post_norm={cfg.post_norm}"
        )
    if cfg.output_logits_soft_cap is not None:
        reasons["center_unembed"] = "final-logit soft-capping is not invariant to shifting the logits"
    return reasons


def resolve_steps(cfg: ModelConfig, processed: bool = False, **steps: bool | None) -> dict[str, bool]:
    """Which steps to run: explicit ``True``/``False`` win; ``None`` means "if ``processed`` and valid".

    Raises `ConfigError` for an explicitly requested step this architecture cannot take.

    Example:
        >>> resolve_steps(model.cfg, processed=True, center_unembed=False)
        {'fold_ln': True, 'center_writing_weights': True, 'center_unembed': False, 'fold_value_biases': True}
    """
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise ConfigError(f"unknown weight-processing steps {unknown}; choose from {list(STEPS)}")
    reasons = unsupported_steps(cfg)
    chosen = {}
    for step in STEPS:
        value = steps.get(step)
        if value and step in reasons:
            raise ConfigError(f"{step}=True is impossible for {cfg.model_name}: {reasons[step]}")
        chosen[step] = bool(value) if value is not None else processed and step not in reasons
    return chosen


@torch.no_grad()
def process_weights(
    model: HookedTransformer,
    *,
    fold_ln: bool | None = None,
    center_writing_weights: bool | None = None,
    center_unembed: bool | None = None,
    fold_value_biases: bool | None = None,
    processed: bool = False,
) -> HookedTransformer:
    """Apply the chosen steps in place (in the order of `STEPS`) and return the model.

    Example:
        >>> before = model(tokens).log_softmax(-1)
        >>> _ = process_weights(model, processed=True)
        >>> torch.allclose(model(tokens).log_softmax(-1), before, atol=1e-5)
        True
    """
    chosen = resolve_steps(
        model.cfg,
        processed,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
        fold_value_biases=fold_value_biases,
    )
    for step, run in (
        ("fold_ln", _fold_ln),
        ("center_writing_weights", _center_writing_weights),
        ("center_unembed", _center_unembed),
        ("fold_value_biases", _fold_value_biases),
    ):
        if chosen[step]:
            run(model)
            model.cfg.extra.setdefault("weight_processing", []).append(step)
    return model


def _untie(model: HookedTransformer) -> None:
    if model.cfg.tie_word_embeddings:
        model.unembed.w_u = nn.Parameter(model.embed.W_E.detach().clone())
        model.cfg.tie_word_embeddings = False


def _bias(module: nn.Module, name: str, size: int, like: Tensor) -> Tensor:
    """The bias parameter ``name`` of ``module``, created as zeros when the module has none."""
    if dict(module.named_parameters(recurse=False)).get(name) is None:
        setattr(module, name, nn.Parameter(torch.zeros(size, dtype=like.dtype, device=like.device)))
    return getattr(module, name)


def _fold_norm_into(norm: nn.Module | None, readers: list[tuple[nn.Module, str, str]]) -> bool:
    """Fold ``norm``'s weight and bias into ``(module, weight_name, bias_name)`` readers ``[out, d]``,
    then remove them from ``norm`` (TransformerLens' ``LNPre``/``RMSPre``)."""
    if norm is None:
        return False
    w, b = norm.w, getattr(norm, "b", None)
    for module, weight_name, bias_name in readers:
        weight = getattr(module, weight_name)
        if b is not None:
            bias = _bias(module, bias_name, weight.shape[0], weight)
            bias.add_(weight @ b)
        weight.mul_(w)
    norm.w = None
    if b is not None:
        norm.b = None
    return True


def _centre_readers(readers: list[tuple[nn.Module, str]]) -> None:
    """Remove each reader's mean over ``d_model`` (its input axis): exact when it reads a
    LayerNorm's output, whose mean over ``d_model`` is zero."""
    for module, weight_name in readers:
        weight = getattr(module, weight_name)  # [out, d_model]
        weight.sub_(weight.mean(-1, keepdim=True))


def _fold_ln(model: HookedTransformer) -> None:
    """Fold each pre-norm into its readers; after a LayerNorm, also centre the readers
    (``w_q``/``w_k``/``w_v``, ``w_in``, ``w_u``) over ``d_model``, as TransformerLens does."""
    cfg = model.cfg
    layernorm = cfg.normalization_type == "LN"
    for block in model.blocks:
        attn = block.attn
        qkv = [(attn, f"w_{n}", f"b_{n}") for n in "qkv"]
        if _fold_norm_into(block.ln1, qkv) and layernorm:
            cfg.attn_qkv_bias = True
            _centre_readers([(attn, f"w_{n}") for n in "qkv"])
        if not cfg.attn_only:
            mlp = [(block.mlp, "w_in", "b_in")] + ([(block.mlp, "w_gate", "b_gate")] if cfg.gated_mlp else [])
            if _fold_norm_into(block.ln2, mlp) and layernorm:
                _bias(block.mlp, "b_out", cfg.d_model, block.mlp.w_out)
                cfg.mlp_bias = True
                _centre_readers([(block.mlp, "w_in")])
    if model.ln_final is not None:
        _untie(model)
        if _fold_norm_into(model.ln_final, [(model.unembed, "w_u", "b_U")]) and layernorm:
            cfg.unembed_bias = True
            _centre_readers([(model.unembed, "w_u")])
    cfg.normalization_type = "LNPre" if layernorm else "RMSPre"


def _center_writing_weights(model: HookedTransformer) -> None:
    _untie(model)
    model.embed.W_E.sub_(model.embed.W_E.mean(-1, keepdim=True))
    if model.cfg.positional_embedding_type == "standard":
        model.pos_embed.W_pos.sub_(model.pos_embed.W_pos.mean(-1, keepdim=True))
    for block in model.blocks:
        writers = [(block.attn, "w_o", "b_o")] + ([] if model.cfg.attn_only else [(block.mlp, "w_out", "b_out")])
        for module, weight_name, bias_name in writers:
            weight = getattr(module, weight_name)  # [d_model, in]
            weight.sub_(weight.mean(0, keepdim=True))
            bias = getattr(module, bias_name)
            if bias is not None:
                bias.sub_(bias.mean())


def _center_unembed(model: HookedTransformer) -> None:
    _untie(model)
    w_u = model.unembed.w_u  # [d_vocab, d_model]
    w_u.sub_(w_u.mean(0, keepdim=True))
    if model.unembed.bias is not None:
        model.unembed.bias.sub_(model.unembed.bias.mean())


def _fold_value_biases(model: HookedTransformer) -> None:
    cfg = model.cfg
    for block in model.blocks:
        attn = block.attn
        if attn.b_v is None:
            continue
        # Query head h reads key/value head h // n_kv_groups.
        b_v = attn.b_v.view(cfg.n_key_value_heads, cfg.d_head).repeat_interleave(cfg.n_kv_groups, dim=0)
        _bias(attn, "b_o", cfg.d_model, attn.w_o).add_(attn.w_o @ b_v.flatten())
        attn.b_v.zero_()
        cfg.attn_out_bias = True

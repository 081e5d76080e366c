"""`HookedTransformer` for TransformerLens code: mechscope's model with TransformerLens' constructor,
``from_pretrained`` (processing by default, TransformerLens' flags) and model helpers.

The forward pass, hooks and caching are mechscope's own (`mechscope.HookedTransformer`); this
class only adds TransformerLens' entry points and names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.analysis.weights import composition_scores
from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.hooks import HookPoint
from mechscope.loading.families import adapter_for
from mechscope.loading.pretrained import load, read_hf_weights
from mechscope.model.config import ModelConfig
from mechscope.model.context import AttentionContext
from mechscope.model.init import init_gpt2
from mechscope.model.placement import place
from mechscope.model.processing import process_weights, unsupported_steps
from mechscope.model.tokenize import Tokenizer, input_tokens
from mechscope.model.transformer import HookedTransformer as _Base
from mechscope.tl.config import DTYPES, HookedTransformerConfig
from mechscope.tl.hook_points import CachingHooks
from mechscope.tl.refactor import refactor_factored_attn_matrices as refactor
from mechscope.tl.utils import get_device, lm_cross_entropy_loss


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside a mechscope `Tokenizer`, or the object itself."""
    return tokenizer.hf if isinstance(tokenizer, Tokenizer) else tokenizer


class TokenNotFoundError(InputError, AssertionError):
    """`HookedTransformer.get_token_position` of a token the prompt lacks: an `InputError`, and the
    `AssertionError` TransformerLens raises there."""


class HookedTransformer(_Base, CachingHooks):
    """TransformerLens' ``HookedTransformer`` on mechscope's model.

    ``HookedTransformer(cfg)`` takes a `HookedTransformerConfig` (or its dict, or a mechscope
    `ModelConfig`) and initialises the weights as TransformerLens does (``init_mode="gpt2"``:
    normal weights with ``cfg.initializer_range``, zero biases, unit norm weights).

    Example:
        >>> from mechscope.tl import HookedTransformerConfig
        >>> cfg = HookedTransformerConfig(d_model=16, d_head=4, n_layers=2, n_ctx=8, d_vocab=20, act_fn="gelu", seed=0)
        >>> tl_model = HookedTransformer(cfg)
        >>> tl_model(torch.tensor([[1, 2, 3]])).shape, tl_model.cfg.n_params
        (torch.Size([1, 3, 20]), 6144)
    """

    def __init__(
        self,
        cfg: HookedTransformerConfig | ModelConfig | dict,
        tokenizer: Any = None,
        move_to_device: bool = True,
        default_padding_side: Literal["left", "right"] | None = None,
    ) -> None:
        if isinstance(cfg, dict):
            cfg = HookedTransformerConfig.from_dict(cfg)
        tl_cfg = cfg if isinstance(cfg, HookedTransformerConfig) else None
        hf_tok = _hf_tokenizer(tokenizer)
        if tl_cfg is not None:
            if tl_cfg.d_vocab == -1 and hf_tok is not None:
                tl_cfg.d_vocab = max(hf_tok.vocab.values()) + 1
                tl_cfg.d_vocab_out = tl_cfg.d_vocab if tl_cfg.d_vocab_out == -1 else tl_cfg.d_vocab_out
            if tl_cfg.init_mode != "gpt2" and tl_cfg.init_weights:
                raise ConfigError(f"init_mode={tl_cfg.init_mode!r} is not supported yet; use init_mode='gpt2'")
            model_cfg = tl_cfg.to_model_config()
            model_cfg.device = str(tl_cfg.device)
        elif isinstance(cfg, ModelConfig):
            model_cfg = cfg
        else:
            raise ConfigError(
                f"cfg must be a HookedTransformerConfig, its dict or a ModelConfig, got {type(cfg).__name__}"
            )
        super().__init__(model_cfg, tokenizer, default_padding_side)
        if tl_cfg is not None and tl_cfg.use_hook_tokens:
            self.hook_tokens = HookPoint()  # [batch, pos] token ids, before the embedding
            self.setup()
        self.initializer_range = None if tl_cfg is None else tl_cfg.initializer_range
        self.seed = None if tl_cfg is None else tl_cfg.seed
        if tl_cfg is not None:
            if tl_cfg.init_weights:
                self.init_weights()
            self.to(tl_cfg.dtype)
            if move_to_device:
                self.to(tl_cfg.device)

    def init_weights(self, seed: int | None = None, std: float | None = None) -> HookedTransformer:
        """Without arguments, TransformerLens' ``init_weights()`` (`init_gpt2` with the config's
        ``initializer_range`` and ``seed``); with ``seed`` or ``std``, mechscope's `init_weights`
        (``std`` 0.02 by default)."""
        if seed is None and std is None:
            return init_gpt2(self, self.initializer_range, self.seed)
        return super().init_weights(seed, 0.02 if std is None else std)

    def to(self, *args, **kwargs):
        """`torch.nn.Module.to`, keeping ``cfg.device`` current (as TransformerLens does)."""
        out = super().to(*args, **kwargs)
        self.cfg.device = str(self.device)
        return out

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        checkpoint_index: int | None = None,
        checkpoint_value: int | None = None,
        checkpoint_label: int | None = None,
        hf_model: Any = None,
        device: str | torch.device | None = None,
        n_devices: int = 1,
        tokenizer: Any = None,
        move_to_device: bool = True,
        fold_value_biases: bool = True,
        default_prepend_bos: bool | None = None,
        default_padding_side: Literal["left", "right"] | None = None,
        dtype: str | torch.dtype = "float32",
        first_n_layers: int | None = None,
        n_ctx: int | None = None,
        **from_pretrained_kwargs: Any,
    ) -> HookedTransformer:
        """Load a pretrained model with TransformerLens' processing defaults (fold LayerNorm, centre
        the writing weights and the unembedding, fold value biases).

        ``model_name`` is a local Hugging Face directory, a mechscope bundled name, a ``.gguf`` file or a
        hub id; ``hf_model`` passes an already loaded ``transformers`` model instead. Steps that do
        not apply to the architecture are skipped as TransformerLens skips them (centring on
        RMSNorm models, ``center_unembed`` with logit soft-capping). ``default_prepend_bos``
        defaults to ``True``, as in TransformerLens. ``n_devices`` splits the blocks evenly over
        ``cuda:0..n-1``. Prints one line, as TransformerLens does.
        """
        if checkpoint_index is not None or checkpoint_value is not None or checkpoint_label is not None:
            raise LoadError(
                "training checkpoints (checkpoint_index/value/label) are not supported; load the "
                "checkpoint's own directory instead"
            )
        unknown = sorted(set(from_pretrained_kwargs) - {"torch_dtype", "trust_remote_code"})
        if unknown:
            raise ConfigError(f"unsupported from_pretrained arguments {unknown}")
        dtype = _dtype(from_pretrained_kwargs.get("torch_dtype", dtype))
        cfg, weights, hf_tok = _source(model_name, hf_model, tokenizer)
        cfg.default_prepend_bos = True if default_prepend_bos is None else default_prepend_bos
        if first_n_layers is not None:
            _keep_layers(cfg, weights, first_n_layers)
        if n_ctx is not None:
            if cfg.positional_embedding_type == "standard" and n_ctx > cfg.n_ctx:
                raise ConfigError(f"n_ctx={n_ctx} exceeds the {cfg.n_ctx} learned positions of {model_name}")
            cfg.n_ctx = n_ctx
            if "pos_embed.W_pos" in weights:
                weights["pos_embed.W_pos"] = weights["pos_embed.W_pos"][:n_ctx]
        model = cls._assemble(cfg, weights, hf_tok, default_padding_side)
        model.process_weights_(
            fold_ln,
            center_writing_weights,
            center_unembed,
            refactor_factored_attn_matrices,
            fold_value_biases=fold_value_biases,
        )
        model.to(dtype)
        if n_devices > 1:
            per = -(-cfg.n_layers // n_devices)
            model = place(
                model, {f"cuda:{i}": range(i * per, min(cfg.n_layers, (i + 1) * per)) for i in range(n_devices)}
            )
            model.cfg.device = "cuda:0"
        elif move_to_device:
            model.to(device if device is not None else get_device())
        print(f"Loaded pretrained model {model_name} into HookedTransformer")
        return model

    def process_weights_(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        refactor_factored_attn_matrices: bool = False,
        *,
        fold_value_biases: bool = True,
    ) -> None:
        """Process the loaded weights in place, as `from_pretrained` does (TransformerLens folds the
        value biases here too; ``fold_value_biases=False`` is mechscope's opt-out). Steps that do
        not apply to the architecture are skipped, as TransformerLens skips them.

        Example:
            >>> tl_model = HookedTransformer(model.cfg).init_weights(seed=0)
            >>> tokens = torch.tensor([[1, 2, 3]])
            >>> before = tl_model(tokens).log_softmax(-1)
            >>> tl_model.process_weights_()
            >>> torch.allclose(tl_model(tokens).log_softmax(-1), before, atol=1e-5)
            True
        """
        skip = unsupported_steps(self.cfg)
        flags = dict(
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            fold_value_biases=fold_value_biases,
        )
        steps = {step: bool(value) and step not in skip for step, value in flags.items()}
        if any(steps.values()):
            process_weights(self, **steps)
        if refactor_factored_attn_matrices:
            refactor(self)

    @classmethod
    def from_pretrained_no_processing(
        cls,
        model_name: str,
        fold_ln: bool = False,
        center_writing_weights: bool = False,
        center_unembed: bool = False,
        refactor_factored_attn_matrices: bool = False,
        fold_value_biases: bool = False,
        dtype: str | torch.dtype = torch.float32,
        default_prepend_bos: bool | None = None,
        default_padding_side: Literal["left", "right"] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> HookedTransformer:
        """`from_pretrained` with every processing step off: activations equal the source model's."""
        return cls.from_pretrained(
            model_name,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
            refactor_factored_attn_matrices=refactor_factored_attn_matrices,
            fold_value_biases=fold_value_biases,
            dtype=dtype,
            default_prepend_bos=default_prepend_bos,
            default_padding_side=default_padding_side,
            **from_pretrained_kwargs,
        )

    @classmethod
    def _assemble(
        cls, cfg: ModelConfig, weights: dict[str, Tensor], hf_tok: Any, padding_side: str | None
    ) -> HookedTransformer:
        with torch.device("meta"):
            model = cls(cfg, hf_tok, default_padding_side=padding_side)
        weights = {k: v.to(torch.float32) for k, v in weights.items()}
        if cfg.tie_word_embeddings:
            weights["unembed.w_u"] = weights["embed.W_E"]
        missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
        if missing or unexpected:
            raise LoadError(f"converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
        if cfg.tie_word_embeddings:
            model.unembed.w_u = model.embed.W_E
        model.cfg.device = "cpu"
        return model.eval()

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        input: str | list[str] | Tensor = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        return_type: str | None = "input",
        verbose: bool = True,
        *,
        attention_mask: Tensor | None = None,
        seed: int | None = None,
        **generation_kwargs: Any,
    ) -> Any:
        """`mechscope.HookedTransformer.generate` with TransformerLens' Hugging Face keywords:
        ``output_logits=True`` returns a ``GenerateDecoderOnlyOutput`` with ``sequences`` (the
        prompt and new tokens) and ``logits`` (one ``[batch, d_vocab]`` tensor per step: the raw
        logits each token was chosen from); ``return_dict_in_generate`` is accepted and ignored,
        as in TransformerLens. Other keywords raise (TransformerLens warns and drops them).

        Example:
            >>> tl_model = HookedTransformer(model.cfg).init_weights(seed=0)
            >>> out = tl_model.generate(torch.tensor([[1, 2]]), 3, do_sample=False, verbose=False, output_logits=True)
            >>> out.sequences.shape, len(out.logits), out.logits[0].shape
            (torch.Size([1, 5]), 3, torch.Size([1, 50]))
        """
        output_logits = bool(generation_kwargs.pop("output_logits", False))
        generation_kwargs.pop("return_dict_in_generate", None)
        if generation_kwargs:
            raise InputError(
                f"unsupported generate arguments {sorted(generation_kwargs)}; "
                "of Hugging Face's generation keywords only output_logits is supported"
            )
        steps: list[Tensor] = []
        handle = None
        if output_logits:
            handle = self.register_forward_hook(lambda module, args, out: steps.append(out[:, -1].detach().clone()))
        try:
            out = super().generate(
                input, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p, temperature,
                freq_penalty, use_past_kv_cache, prepend_bos, padding_side,
                "tokens" if output_logits else return_type, verbose, attention_mask=attention_mask, seed=seed,
            )  # fmt: skip
        finally:
            if handle is not None:
                handle.remove()
        if not output_logits:
            return out
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=out, logits=tuple(steps))

    # ------------------------------------------------------------------ helpers
    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Tensor | None = None,
        per_token: bool = False,
    ) -> Tensor:
        """Next-token cross-entropy (`mechscope.tl.utils.lm_cross_entropy_loss`)."""
        return lm_cross_entropy_loss(logits, tokens.to(logits.device), attention_mask, per_token)

    def input_to_embed(
        self,
        input: str | list[str] | Int[Tensor, "batch pos"],
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        attention_mask: Tensor | None = None,
        past_kv_cache: Any = None,
    ) -> tuple[Tensor, Tensor, None, Tensor | None]:
        """``(residual, tokens, shortformer_pos_embed, attention_mask)`` entering block 0.

        ``shortformer_pos_embed`` is always ``None`` (no shortformer models); the mask is ``None``
        when nothing is padded.

        Example:
            >>> tl_model = HookedTransformer(model.cfg).init_weights(seed=0)
            >>> resid, toks, _, mask = tl_model.input_to_embed(torch.tensor([[1, 2, 3]]))
            >>> resid.shape, mask is None
            (torch.Size([1, 3, 32]), True)
        """
        tokens, mask = input_tokens(self, input, attention_mask, prepend_bos, padding_side)
        if hasattr(self, "hook_tokens"):
            tokens = self.hook_tokens(tokens)
        batch, seq = tokens.shape
        ctx = AttentionContext.build(mask, batch, seq, tokens.device, past_kv_cache)
        resid = self.hook_embed(self.embed(tokens))
        if self.cfg.positional_embedding_type == "standard":
            resid = resid + self.hook_pos_embed(self.pos_embed(ctx.positions))
        return resid, tokens, None, mask

    def to_single_str_token(self, int_token: int) -> str:
        """The text of token ``int_token``.

        Example:
            >>> model.to_single_str_token(5)   # doctest: +SKIP
            'e'
        """
        if not isinstance(int_token, int):
            raise InputError(f"to_single_str_token takes an int, got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Tensor,
        mode: Literal["first", "last"] = "first",
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> int:
        """Position of ``single_token`` in ``input`` (a string, ``[pos]`` or ``[1, pos]`` tokens).

        Example:
            >>> HookedTransformer(model.cfg).get_token_position(3, torch.tensor([1, 3, 2, 3]), mode="last")
            3
        """
        tokens = (
            self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
            if isinstance(input, str)
            else input
        )
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise InputError(f"rank-2 tokens must have shape [1, pos], got {tuple(tokens.shape)}")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        indices = torch.arange(len(tokens), device=tokens.device)[tokens == single_token]
        if len(indices) == 0:
            raise TokenNotFoundError(f"token {single_token} does not occur in the prompt")
        if mode not in ("first", "last"):
            raise InputError(f"mode must be 'first' or 'last', not {mode!r}")
        return int(indices[0 if mode == "first" else -1])

    @property
    def W_E_pos(self) -> Float[Tensor, "d_vocab_plus_n_ctx d_model"]:
        """``W_E`` and ``W_pos`` stacked: a basis of everything the first residual stream holds."""
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``, layer-major, as TransformerLens labels heads."""
        return [f"L{layer}H{head}" for layer in range(self.cfg.n_layers) for head in range(self.cfg.n_heads)]

    def all_composition_scores(self, mode: Literal["Q", "K", "V"]) -> Float[Tensor, "layer head layer head"]:
        """Q-, K- or V-composition scores of every pair of heads (zero unless the reader is later):
        `mechscope.analysis.composition_scores`, TransformerLens' definition.

        Example:
            >>> HookedTransformer(model.cfg).all_composition_scores("K").shape
            torch.Size([3, 4, 3, 4])
        """
        return composition_scores(self, mode)

    @property
    def n_params_total(self) -> int:
        """Every parameter, embeddings, biases and norms included (``cfg.n_params`` counts only the
        attention and MLP matrices)."""
        return sum(p.numel() for p in self.parameters())


def _source(model_name: str, hf_model: Any, tokenizer: Any) -> tuple[ModelConfig, dict[str, Tensor], Any]:
    """``(cfg, converted weights, HF tokenizer or None)`` for `HookedTransformer.from_pretrained`."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(os.fspath(model_name)).expanduser()
    if hf_model is not None:
        adapter = adapter_for(hf_model.config.model_type)
        cfg = adapter.config_from_hf(hf_model.config)
        weights = adapter.convert_weights(dict(hf_model.state_dict()), cfg)
    elif path.is_dir():
        adapter = adapter_for(AutoConfig.from_pretrained(path).model_type)
        cfg = adapter.config_from_hf(AutoConfig.from_pretrained(path))
        weights = adapter.convert_weights(read_hf_weights(path), cfg)
    else:
        base = load(model_name, device="cpu")
        cfg, weights = base.cfg, dict(base.state_dict())
        if tokenizer is None and base.tokenizer is not None:
            tokenizer = base.tokenizer
    if tokenizer is None and path.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(path)
    cfg.model_name = str(model_name)
    return cfg, weights, _hf_tokenizer(tokenizer)


def _keep_layers(cfg: ModelConfig, weights: dict[str, Tensor], n: int) -> None:
    """Keep the first ``n`` blocks of ``cfg`` and ``weights`` (in place)."""
    if not 0 < n <= cfg.n_layers:
        raise ConfigError(f"first_n_layers={n} must be in [1, {cfg.n_layers}]")
    for key in [k for k in weights if k.startswith("blocks.") and int(k.split(".")[1]) >= n]:
        del weights[key]
    cfg.n_layers = n
    if cfg.layer_types is not None:
        cfg.layer_types = cfg.layer_types[:n]

"""`HookedTransformer`: the forward pass and its hooks.

Tokenisation (`mechscope.model.tokenize`), stacked weights (`mechscope.model.weights`),
initialisation, the loss and generation live in their own modules and appear here as methods.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.cache import ActivationCache
from mechscope.cache_plan import cache_size, check_before_caching
from mechscope.errors import InputError
from mechscope.hooks import HookedRootModule, HookPoint
from mechscope.model import tokenize
from mechscope.model.components import Embed, PosEmbed, TransformerBlock, Unembed, make_norm
from mechscope.model.config import ModelConfig
from mechscope.model.context import AttentionContext, KVCache
from mechscope.model.generate import generate
from mechscope.model.image import AttentionPool, PatchEmbed
from mechscope.model.init import init_gpt2, init_weights
from mechscope.model.loss import check_return_type, forward_output
from mechscope.model.tokenize import PaddingSide, Tokenizer, check_mask, check_positions, input_tokens
from mechscope.model.weights import StackedWeights

ModelInput = str | list[str] | Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | Float[Tensor, "batch pos d_model"]
ReturnType = Literal["logits", "loss", "both", None]

_OPT_IN_FLAGS = {
    "hook_result": "use_attn_result",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_attn_in": "use_attn_in",
    "hook_mlp_in": "use_hook_mlp_in",
}


class HookedTransformer(StackedWeights, HookedRootModule):
    """A decoder-only transformer with a named hook point on every activation.

    Build one with `mechscope.load` (pretrained weights) or from a `ModelConfig` (weights
    initialised as TransformerLens does, `init_gpt2`; `init_weights` re-draws them with a seed).
    ``tokenizer`` is a Hugging Face tokenizer (or a mechscope `Tokenizer`): ``model.tokenizer``
    is the Hugging Face tokenizer and ``model.codec`` mechscope's BOS and padding rules around
    it. Layer-stacked weights (``W_Q``, ``W_O``, ``W_in``, ``QK``, ...) come from `StackedWeights`.

    Example:
        >>> model = HookedTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64,
        ...                                       d_vocab=50, n_ctx=16)).init_weights(seed=0)
        >>> logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> logits.shape, cache["blocks.1.attn.hook_pattern"].shape
        (torch.Size([1, 3, 50]), torch.Size([1, 4, 3, 3]))
    """

    def __init__(
        self, cfg: ModelConfig, tokenizer: Any = None, default_padding_side: PaddingSide | None = "right"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg) if cfg.image_size is None else PatchEmbed(cfg)  # tokens, or image pixels
        self.ln_pre = make_norm(cfg, enabled=cfg.embed_norm)  # CLIP's norm on the image embedding
        self.hook_embed = HookPoint()
        if cfg.positional_embedding_type == "standard":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList(TransformerBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = make_norm(cfg, pre=True)
        self.unembed = Unembed(cfg)
        if cfg.attention_pool:
            self.pool_head = AttentionPool(cfg)  # run on demand: `mechscope.vision.pooled_image`
        if cfg.tie_word_embeddings:
            self.unembed.w_u = self.embed.W_E
        self.setup()
        init_gpt2(self)
        self.codec = None
        if tokenizer is not None:
            self.set_tokenizer(tokenizer, default_padding_side)

    init_weights = init_weights  # `mechscope.model.init.init_weights`, as a method
    set_tokenizer = tokenize.set_tokenizer

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (``None`` without one); its ``padding_side`` is the default
        of every call. Assigning a tokenizer (or ``None``) rewraps ``model.codec``."""
        return None if self.codec is None else self.codec.hf

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.codec = Tokenizer.wrap(tokenizer, self.cfg.default_prepend_bos)

    def _opt_in_enabled(self, name: str) -> bool:
        flag = _OPT_IN_FLAGS.get(name.rsplit(".", 1)[-1])
        return bool(flag and getattr(self.cfg, flag))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: ModelInput,
        return_type: ReturnType = "logits",
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        attention_mask: Tensor | None = None,
        tokens: Tensor | None = None,
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        loss_per_token: bool = False,
        past_kv_cache: KVCache | None = None,
    ):
        """Run the model.

        Args:
            input: a string, a list of strings, token ids ``[batch, pos]`` (or ``[pos]``), pixels
                ``[batch, n_channels, image_size, image_size]`` for vision models, or with
                ``start_at_layer`` the residual stream ``[batch, pos, d_model]`` entering that layer.
            return_type: ``"logits"``, ``"loss"`` (mean next-token cross-entropy), ``"both"``
                (``(logits, loss)``) or ``None``.
            start_at_layer: begin at this block, reading the residual stream from ``input``.
            stop_at_layer: stop before this block and return the residual stream entering it.
            attention_mask: ``[batch, pos]``, 1 for real tokens and 0 for padding. Built
                automatically for lists of strings.
            tokens: the token ids, needed for the loss when ``start_at_layer`` is set.
            prepend_bos, padding_side: tokenisation of string input (see `to_tokens`);
                ``padding_side=None`` is the tokenizer's. Token ids padded on the left and given
                without a mask are masked at their leading pad tokens, as in TransformerLens.
            loss_per_token: return the loss at every position ``[batch, pos - 1]`` instead of the mean.
            past_kv_cache: a `KVCache` holding earlier positions; this forward attends to them,
                continues their positions and appends its own keys and values (see `generate`).

        Example:
            >>> resid = model(tokens, stop_at_layer=2)
            >>> torch.equal(model(resid, start_at_layer=2), model(tokens))
            True
        """
        check_return_type(return_type)
        n_layers = self.cfg.n_layers
        start = self._layer_index(start_at_layer, "start_at_layer", 0)
        stop = self._layer_index(stop_at_layer, "stop_at_layer", n_layers)
        if start > stop:
            raise InputError(f"start_at_layer={start_at_layer} is after stop_at_layer={stop_at_layer}")
        if past_kv_cache is not None and (start_at_layer is not None or stop_at_layer is not None):
            raise InputError("past_kv_cache needs a full forward: drop start_at_layer/stop_at_layer")
        if start_at_layer is None and self.cfg.image_size is not None:
            resid = self.embed(input)  # pixels -> [batch, pos, d_model]
            resid = self.hook_embed(resid if self.ln_pre is None else self.ln_pre(resid))
            ctx = AttentionContext.build(None, resid.shape[0], resid.shape[1], resid.device)
        elif start_at_layer is None:
            tokens, attention_mask = input_tokens(self, input, attention_mask, prepend_bos, padding_side)
            if hasattr(self, "hook_tokens"):  # added by TransformerLens' use_hook_tokens
                tokens = self.hook_tokens(tokens)
            batch, seq = tokens.shape
            ctx = AttentionContext.build(attention_mask, batch, seq, tokens.device, past_kv_cache)
            if (seq if ctx.key_positions is None else ctx.key_positions.shape[1]) > self.cfg.n_ctx:
                check_positions(self.cfg, int(ctx.positions.max()) + 1)
            resid = self.hook_embed(self.embed(tokens))
            if self.cfg.positional_embedding_type == "standard":
                resid = resid + self.hook_pos_embed(self.pos_embed(ctx.positions))
        else:
            if not isinstance(input, Tensor) or input.dim() != 3 or input.shape[-1] != self.cfg.d_model:
                raise InputError(
                    f"with start_at_layer, input must be the residual stream [batch, pos, {self.cfg.d_model}], "
                    f"got {getattr(input, 'shape', type(input).__name__)}"
                )
            resid = input
            batch, seq = input.shape[:2]
            attention_mask = check_mask(attention_mask, (batch, seq), self.device)
            ctx = AttentionContext.build(attention_mask, batch, seq, input.device)
        resid = self.run_blocks(resid, start, stop, ctx)
        if stop_at_layer is not None:
            return resid
        resid = resid.to(self.unembed.w_u.device)
        if self.ln_final is not None:
            resid = self.ln_final(resid)
        logits = self.unembed(resid)
        cap = self.cfg.output_logits_soft_cap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return forward_output(logits, tokens, attention_mask, return_type, loss_per_token)

    def run_blocks(
        self, resid: Float[Tensor, "batch pos d_model"], start: int, stop: int, context: AttentionContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """Blocks ``start:stop`` on the residual stream ``resid`` under ``context`` (positions,
        padding, key/value cache); the residual stream leaving block ``stop - 1``.

        The one block loop: `forward`, generation and the patching engine's suffix runs use it.
        Blocks placed on several devices (``device_map``) are followed hop by hop.

        Example:
            >>> resid = model(tokens, stop_at_layer=1)
            >>> ctx = AttentionContext.build(None, 1, 4, resid.device)
            >>> torch.equal(model.run_blocks(resid, 1, 3, ctx), model(tokens, stop_at_layer=3))
            True
        """
        for block in self.blocks[start:stop]:
            device = block.attn.w_o.device
            if resid.device != device:
                resid, context = resid.to(device), context.to(device)
            resid = block(resid, context)
        return resid

    def _layer_index(self, value: int | None, what: str, default: int) -> int:
        n = self.cfg.n_layers
        if value is None:
            return default
        index = value + n if value < 0 else value
        if not 0 <= index <= n:
            raise InputError(f"{what}={value} is out of range for a model with {n} layers")
        return index

    # ------------------------------------------------------------------ hooks
    def run_with_cache(
        self,
        *model_args,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        check_fits: bool | None = None,
        **kwargs,
    ) -> tuple[object, ActivationCache | dict[str, Tensor]]:
        """Run `forward` and cache the activations selected by ``names_filter`` (see
        `HookedRootModule.run_with_cache` for ``names_filter``, ``device``, ``incl_bwd``,
        ``pos_slice``, ``reset_hooks_end``, ``clear_contexts``).

        Returns ``(output, ActivationCache)``, or the plain dict without ``return_cache_object``.
        ``names_filter=None`` caches every hook point that runs by default; naming an opt-in
        point turns it on for the run. Caching only reads activations, so the output equals a
        plain forward's exactly (under ``torch.inference_mode`` to within rounding: torch keeps
        no count of in-place edits there). ``cache_dtype`` stores a lower precision; with
        ``check_fits`` (default: when caching to a CUDA device) a cache larger than the target's
        free memory raises before the run, naming the options that fit (`check_before_caching`).

        Example:
            >>> logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
            >>> cache["blocks.0.attn.hook_z"].shape
            torch.Size([1, 4, 4, 8])
            >>> torch.equal(model.run_with_cache(tokens)[0], model(tokens))
            True
            >>> _, last = model.run_with_cache(tokens, pos_slice=-1, remove_batch_dim=True)
            >>> last["blocks.0.attn.hook_z"].shape, last.has_batch_dim
            (torch.Size([1, 4, 8]), False)
        """
        check_before_caching(self, model_args, kwargs, check_fits)
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    cache_size = cache_size  # `mechscope.cache_plan.cache_size`: the bytes a run_with_cache call will store

    # ------------------------------------------------------------------ generation
    generate = generate  # `mechscope.model.generate.generate`, as a method

    # ------------------------------------------------------------------ tokens (`mechscope.model.tokenize`)
    to_tokens = tokenize.to_tokens
    to_str_tokens = tokenize.to_str_tokens
    to_string = tokenize.to_string
    to_single_token = tokenize.to_single_token

    # ------------------------------------------------------------------ config toggles
    def set_use_attn_result(self, value: bool) -> None:
        """Compute ``blocks.{l}.attn.hook_result`` on every forward (it also runs whenever hooked)."""
        self.cfg.use_attn_result = value

    def set_use_split_qkv_input(self, value: bool) -> None:
        """Compute ``blocks.{l}.hook_q_input/hook_k_input/hook_v_input`` on every forward."""
        self.cfg.use_split_qkv_input = value

    def set_use_attn_in(self, value: bool) -> None:
        """Compute ``blocks.{l}.hook_attn_in`` (the attention input: a copy of the residual stream
        before ``ln1``) on every forward (it also runs whenever hooked)."""
        self.cfg.use_attn_in = value

    def set_use_hook_mlp_in(self, value: bool) -> None:
        """Compute ``blocks.{l}.hook_mlp_in`` (the MLP input: a copy of the residual stream before
        ``ln2``) on every forward (it also runs whenever hooked)."""
        self.cfg.use_hook_mlp_in = value

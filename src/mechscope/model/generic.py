"""`GenericModel`: any Hugging Face causal LM at the block level, without a family adapter.

The `transformers` model runs as it is; mechscope's block-level hook points are attached to its
own modules, found from the module tree (the block list, each block's attention and MLP
children, the final norm) and kept only where a probe forward at load time verifies them:

- ``hook_embed``: the embedding output, when it is exactly the residual stream entering block 0;
- ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post``: each block's input and output;
- ``blocks.{l}.hook_attn_out`` / ``hook_mlp_out``: the attention and MLP children's outputs,
  when they add up to the block's output (``resid_pre + attn_out + mlp_out == resid_post``);
- ``blocks.{l}.hook_resid_mid``: ``resid_pre + attn_out``, when a norm inside the block reads it;
- ``ln_final.hook_out``: the final norm's output (its weights applied), when it reads the last block's
  output; ``ln_final.hook_normalized`` (before the weights, as in TransformerLens) needs an adapter.

Per-head hooks (``hook_q``, ``hook_z``, ``hook_pattern``, ...) need a family adapter: one file
in ``mechscope/loading/families/``. Everything the probe rejected is listed in ``model.notice``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mechscope.cache_plan import cache_size, check_before_caching
from mechscope.errors import HookNameError, InputError, LoadError
from mechscope.hooks import HookedRootModule, HookPoint
from mechscope.model import tokenize
from mechscope.model.context import AttentionContext, KVCache
from mechscope.model.generate import generate
from mechscope.model.generic_probe import (
    GenericConfig,
    find_layout,
    first_tensor,
    probe,
    sums_match,
    with_first_tensor,
)
from mechscope.model.loss import check_return_type, forward_output
from mechscope.model.tokenize import Tokenizer, check_mask, input_tokens
from mechscope.names import unknown_name_error

ADAPTER_CONTRACT = (
    "per-head and attention-internal hooks need a family adapter: add one file in "
    "src/mechscope/loading/families/ defining MODEL_TYPES, DEFAULT_PREPEND_BOS, config_from_hf(hf_config) "
    "and convert_weights(state_dict, cfg), and list it in families/__init__.py"
)
_ADAPTER_ONLY = ("attn.", "ln1.", "ln2.", "mlp.", "hook_q_input", "hook_k_input", "hook_v_input")
_ADAPTER_ONLY += ("hook_attn_in", "hook_mlp_in", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized")


class _Stopped(Exception):
    def __init__(self, resid: Tensor) -> None:
        super().__init__("stop_at_layer reached")
        self.resid = resid


@dataclass
class _RunState:
    active: bool = False
    start: int | None = None
    start_resid: Tensor | None = None
    stop: int | None = None
    resid_pre: dict[int, Tensor] = field(default_factory=dict)


class PassThrough(nn.Module):
    """Stands in for a block that ``start_at_layer`` skips: returns its input, in the block's output
    format (a tensor, or a tuple of ``length`` with the hidden states first)."""

    def __init__(self, length: int | None) -> None:
        super().__init__()
        self.length = length

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return hidden if self.length is None else (hidden, *([None] * (self.length - 1)))


class BlockHooks(nn.Module):
    """The hook points of one block of a `GenericModel` (only those the probe verified)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        for name in names:
            setattr(self, name, HookPoint())


class GenericModel(HookedRootModule):
    """A Hugging Face causal LM with mechscope's block-level hook points (see the module docstring).

    Build one with ``mechscope.load(path, adapter="generic")`` (automatic for a ``model_type``
    without an adapter) or `GenericModel.wrap`. ``run_with_cache``, ``run_with_hooks``,
    ``generate``, ``start_at_layer``/``stop_at_layer`` and the activation-patching entry points
    work on the offered hook points.

    Example:
        >>> import transformers
        >>> hf = transformers.StableLmForCausalLM(transformers.StableLmConfig(vocab_size=64, hidden_size=16,
        ...     intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
        >>> model = GenericModel.wrap(hf)
        >>> logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
        >>> cache["blocks.1.hook_resid_mid"].shape, model.notice
        (torch.Size([1, 3, 16]), '')
    """

    reuses_prefix = False  # the patching engine's key/value prefix reuse needs mechscope's own blocks

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, default_prepend_bos: bool = False) -> None:
        super().__init__()
        self.hf = hf_model.eval()
        hf_cfg = hf_model.config.get_text_config()
        n_layers = hf_cfg.num_hidden_layers
        d_model = hf_cfg.hidden_size
        self.layout = find_layout(hf_model, n_layers)
        self.cfg = GenericConfig(
            model_name=getattr(hf_cfg, "name_or_path", "") or hf_cfg.model_type,
            model_type=hf_cfg.model_type,
            n_layers=n_layers,
            d_model=d_model,
            d_vocab=self.layout.head.weight.shape[0],
            n_ctx=getattr(hf_cfg, "max_position_embeddings", None) or getattr(hf_cfg, "n_positions", 2048),
            n_heads=hf_cfg.num_attention_heads,
            d_mlp=getattr(hf_cfg, "intermediate_size", None) or 4 * d_model,
            default_prepend_bos=default_prepend_bos,
            dtype=next(hf_model.parameters()).dtype,
        )
        self.state = _RunState()
        self.forward_parameters = set(inspect.signature(hf_model.forward).parameters)
        found = probe(self.layout, hf_model, self.cfg.d_vocab)
        offered, self.rejected, self.final_norm_form = found.offered, found.rejected, found.final_norm_form
        self.cfg.parallel_attn_mlp = found.parallel
        if found.final_norm_form is not None:
            self.cfg.normalization_type = "LN" if found.final_norm_form.centre else "RMS"
        if "hook_embed" in offered:
            self.hook_embed = HookPoint()
        self.blocks = nn.ModuleList(BlockHooks(offered[f"blocks.{layer}"]) for layer in range(n_layers))
        if "ln_final" in offered:
            self.ln_final = BlockHooks(["hook_out"])
        self._install()
        self.setup()
        self.skips_prefix, self.block_output, self.codec = False, None, None
        self.skips_prefix = self._prefix_skip_works()
        if tokenizer is not None:
            self.set_tokenizer(tokenizer)

    @classmethod
    def wrap(cls, hf_model: nn.Module, tokenizer: Any = None, default_prepend_bos: bool = False) -> GenericModel:
        """Wrap an already loaded ``transformers`` causal LM (see `GenericModel`)."""
        return cls(hf_model, tokenizer, default_prepend_bos)

    set_tokenizer = tokenize.set_tokenizer
    to_tokens = tokenize.to_tokens
    to_str_tokens = tokenize.to_str_tokens
    to_string = tokenize.to_string
    to_single_token = tokenize.to_single_token
    generate = generate
    cache_size = cache_size  # `mechscope.cache_plan.cache_size`: the bytes a run_with_cache call will store

    @property
    def tokenizer(self) -> Any:
        return None if self.codec is None else self.codec.hf

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def W_U(self) -> Tensor:
        """The unembedding ``[d_model, d_vocab]`` (the output head's weight, transposed)."""
        return self.layout.head.weight.T

    @property
    def notice(self) -> str:
        """One line: the block-level hook points the load-time probe rejected, and why (empty if none)."""
        if not self.rejected:
            return ""
        parts = [f"{name}: {why}" for name, why in self.rejected.items()]
        return f"{self.cfg.model_type} wrapped at the block level; not offered: " + "; ".join(parts)

    def setup(self) -> None:
        """Name mechscope's own hook points (the wrapped ``transformers`` modules keep their names)."""
        hf = self.hf
        del self.hf
        try:
            super().setup()
        finally:
            self.hf = hf

    # ------------------------------------------------------------------ hooks on the wrapped modules
    def _point(self, name: str, x: Tensor) -> Tensor:
        point = self.hook_dict[name]
        if not (point.fwd_hooks or point.bwd_hooks):
            return x
        out = point(x)
        return out.clone() if out is x else out  # transformers may add in place into its modules' outputs

    def _install(self) -> None:
        lay = self.layout
        if hasattr(self, "hook_embed"):
            lay.embed.register_forward_hook(lambda m, a, o: self._point("hook_embed", o) if self._live(-1) else None)
        for layer, block in enumerate(lay.blocks):
            names = dict(self.blocks[layer].named_children())
            block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True)
            block.register_forward_hook(self._out_hook(f"blocks.{layer}.hook_resid_post", layer))
            if "hook_attn_out" in names:
                lay.attn[layer].register_forward_hook(self._attn_hook(layer, "hook_resid_mid" in names))
            if "hook_mlp_out" in names:
                lay.mlp[layer].register_forward_hook(self._out_hook(f"blocks.{layer}.hook_mlp_out", layer))
        if lay.final_norm is not None:
            lay.final_norm.register_forward_pre_hook(self._final_pre_hook)
            if hasattr(self, "ln_final"):
                lay.final_norm.register_forward_hook(self._out_hook("ln_final.hook_out", self.cfg.n_layers))

    def _live(self, layer: int) -> bool:
        """Whether hooks at ``layer`` (-1: the embedding) run: in a forward, from ``start_at_layer`` on."""
        state = self.state
        return state.active and (state.start is None or layer >= state.start)

    def _pre_hook(self, layer: int):
        state = self.state

        def hook(module, args, kwargs):
            if not self._live(layer):
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if state.stop == layer:
                raise _Stopped(hidden)
            if state.start == layer:
                hidden = state.start_resid.to(hidden.device, hidden.dtype)
            hidden = self._point(f"blocks.{layer}.hook_resid_pre", hidden)
            state.resid_pre[layer] = hidden
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    def _out_hook(self, name: str, layer: int):
        def hook(module, args, out):
            return with_first_tensor(out, self._point(name, first_tensor(out))) if self._live(layer) else None

        return hook

    def _attn_hook(self, layer: int, has_mid: bool):
        name, mid_name = f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_resid_mid"

        def hook(module, args, out):
            if not self._live(layer):
                return None
            attn = self._point(name, first_tensor(out))
            point = self.hook_dict[mid_name] if has_mid else None
            if point is not None and (point.fwd_hooks or point.bwd_hooks):
                pre = self.state.resid_pre[layer]
                mid = pre + attn
                new = self._point(mid_name, mid)
                attn = attn if new is mid else new - pre
            return with_first_tensor(out, attn)

        return hook

    def _final_pre_hook(self, module, args):
        if self.state.active and self.state.stop == self.cfg.n_layers:
            raise _Stopped(args[0])

    def _check_name(self, name: str) -> None:
        if name in self.hook_dict:
            return
        tail = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        if tail.startswith(_ADAPTER_ONLY) or tail in _ADAPTER_ONLY:
            raise HookNameError(f"{name!r} is not offered by the generic (block-level) wrapper: {ADAPTER_CONTRACT}")
        generic = "blocks.{l}." + tail if name.startswith("blocks.") else name
        if generic in self.rejected:
            raise HookNameError(f"{name!r} is not offered for this model: {self.rejected[generic]}")
        raise unknown_name_error(name, self.hook_dict)

    def hook_names(self, names_filter=None) -> list[str]:
        if isinstance(names_filter, str):
            self._check_name(names_filter)
        elif isinstance(names_filter, (list, tuple)):
            for name in names_filter:
                if isinstance(name, str):
                    self._check_name(name)
        return super().hook_names(names_filter)

    def _points(self, target):
        if isinstance(target, str):
            self._check_name(target)
        return super()._points(target)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input: Any,
        return_type: Literal["logits", "loss", "both", None] = "logits",
        *,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        attention_mask: Tensor | None = None,
        tokens: Tensor | None = None,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
        loss_per_token: bool = False,
        past_kv_cache: KVCache | None = None,
    ):
        """Run the wrapped model under the attached hooks (arguments as `HookedTransformer.forward`).

        ``start_at_layer`` replaces the residual stream entering that block with ``input``
        (``[batch, pos, d_model]``) inside a forward on ``tokens`` (placeholder ids when not
        given), as ``transformers`` builds positions and masks in its own forward. The blocks
        before it are skipped (`PassThrough`) where the load-time probe showed that this gives the
        same result (``skips_prefix``), and run otherwise. ``start_at_layer=n_layers`` applies
        the final norm and head only.
        """
        check_return_type(return_type)
        n = self.cfg.n_layers
        start = None if start_at_layer is None else self._layer_index(start_at_layer, "start_at_layer")
        stop = None if stop_at_layer is None else self._layer_index(stop_at_layer, "stop_at_layer")
        if start is not None and stop is not None and start > stop:
            raise InputError(f"start_at_layer={start_at_layer} is after stop_at_layer={stop_at_layer}")
        if stop == n and self.layout.final_norm is None:
            raise InputError(f"stop_at_layer={n} needs a final norm to stop at; use stop_at_layer={n - 1}")
        if past_kv_cache is not None and (start is not None or stop is not None):
            raise InputError("past_kv_cache needs a full forward: drop start_at_layer/stop_at_layer")
        if start is None:
            tokens, attention_mask = input_tokens(self, input, attention_mask, prepend_bos, padding_side)
            resid_in = None
        else:
            if not isinstance(input, Tensor) or input.dim() != 3 or input.shape[-1] != self.cfg.d_model:
                raise InputError(
                    f"with start_at_layer, input must be the residual stream [batch, pos, {self.cfg.d_model}], "
                    f"got {getattr(input, 'shape', type(input).__name__)}"
                )
            resid_in = input
            attention_mask = check_mask(attention_mask, tuple(input.shape[:2]), self.device)
            if start == stop:
                return input
            if start == n:
                return self._head(input, tokens, attention_mask, return_type, loss_per_token)
        run_ids = tokens if resid_in is None or tokens is not None else self._placeholder(resid_in)
        self.state.start, self.state.start_resid, self.state.stop = start, resid_in, stop
        self.state.active = True
        blocks = self.layout.blocks
        skipped = list(blocks[:start]) if start and self.skips_prefix else []
        for layer in range(len(skipped)):
            blocks[layer] = PassThrough(self.block_output)
        try:
            logits = self._hf_forward(run_ids, attention_mask, past_kv_cache)
        except _Stopped as stopped:
            return stopped.resid
        finally:
            for layer, block in enumerate(skipped):
                blocks[layer] = block
            self.state.active, self.state.start_resid = False, None
            self.state.resid_pre.clear()
        return forward_output(logits, tokens, attention_mask, return_type, loss_per_token)

    def _prefix_skip_works(self) -> bool:
        """Whether the blocks before ``start_at_layer`` can be replaced by `PassThrough` (checked on a
        probe: starting at the last block must reproduce the full forward's logits)."""
        n = self.cfg.n_layers
        ids = torch.randint(0, self.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1)).to(self.device)
        seen: list[Any] = []
        handle = self.layout.blocks[0].register_forward_hook(lambda m, a, o: seen.append(o))
        try:
            with torch.no_grad():
                full = self(ids)
                resid = self(ids, stop_at_layer=n - 1)
            handle.remove()
            out = seen[0]
            self.block_output = None if isinstance(out, Tensor) else len(out)
            self.skips_prefix = True
            with torch.no_grad():
                started = self(resid, start_at_layer=n - 1)
        except Exception:  # a model whose loop needs its real blocks (layer attributes, caches): run them
            return False
        finally:
            handle.remove()
            self.skips_prefix = False
        return sums_match(started, full)

    def _placeholder(self, resid: Tensor) -> Tensor:
        return torch.zeros(resid.shape[:2], dtype=torch.long, device=self.device)

    def _layer_index(self, value: int, what: str) -> int:
        n = self.cfg.n_layers
        index = value + n if value < 0 else value
        if not 0 <= index <= n:
            raise InputError(f"{what}={value} is out of range for a model with {n} layers")
        return index

    def _hf_forward(self, tokens: Tensor, mask: Tensor | None, kv: KVCache | None) -> Tensor:
        kwargs: dict[str, Any] = {"input_ids": tokens, "use_cache": kv is not None}
        parameters = self.forward_parameters
        takes_positions = "position_ids" in parameters
        if kv is not None:
            if kv.frozen:
                raise InputError("the generic wrapper cannot read a frozen key/value cache; unfreeze it")
            new_mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
            positions, full_mask, _ = kv.extend(new_mask)
            kwargs["cache" if "cache" in parameters else "past_key_values"] = getattr(kv, "hf_cache", None)
            kwargs["attention_mask"] = full_mask.long()
            if takes_positions:
                kwargs["position_ids"] = positions
        elif mask is not None:
            kwargs["attention_mask"] = mask.long()
            if takes_positions:
                kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.hf(**kwargs)
        if kv is not None:
            kv.hf_cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits

    def _head(self, resid, tokens, mask, return_type, loss_per_token):
        lay = self.layout
        x = resid if lay.final_norm is None else lay.final_norm(resid)
        if hasattr(self, "ln_final"):
            x = self._point("ln_final.hook_out", x)
        return forward_output(lay.head(x), tokens, mask, return_type, loss_per_token)

    def run_blocks(self, resid: Tensor, start: int, stop: int, context: AttentionContext) -> Tensor:
        """Blocks ``start:stop`` on ``resid`` (the patching engine's seam); ``context`` may carry
        padding but no key/value cache (`reuses_prefix` is off for this wrapper)."""
        if context.kv_cache is not None:
            raise InputError("the generic wrapper runs whole sequences: pass reuse_prefix=False")
        mask = None if context.key_padding is None else context.key_padding
        return self(resid, start_at_layer=start, stop_at_layer=stop, attention_mask=mask)

    def run_with_cache(
        self,
        *model_args,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        check_fits: bool | None = None,
        **kwargs,
    ):
        """`HookedRootModule.run_with_cache`, returning an `ActivationCache` (``check_fits`` as in
        `HookedTransformer.run_with_cache`)."""
        from mechscope.cache import ActivationCache

        check_before_caching(self, model_args, kwargs, check_fits)
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache
        return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)


def load_generic(path: Any, device: torch.device, dtype: torch.dtype) -> GenericModel:
    """Load a Hugging Face causal LM directory (or hub id) with `transformers` and wrap it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        try:
            from transformers import AutoConfig

            model_type = repr(AutoConfig.from_pretrained(path).model_type)
        except (OSError, ValueError, KeyError, TypeError):
            model_type = "unknown"
        raise LoadError(
            f"{path} (model_type {model_type}) has no family adapter and could not be loaded as a transformers "
            f"causal LM for the generic block-level wrapper: {exc}"
        ) from exc
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    prepend = tokenize.tokenizer_adds_bos(tokenizer) if tokenizer is not None else False
    model = GenericModel(hf_model, Tokenizer(tokenizer, prepend) if tokenizer is not None else None, prepend)
    model.cfg.model_name = str(path)
    return model

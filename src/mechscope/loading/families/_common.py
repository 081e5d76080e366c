"""Shared helpers for family adapters: strict state-dict reading and HF config access."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from mechscope.errors import ConfigError, WeightConversionError
from mechscope.model.config import ModelConfig
from mechscope.names import closest_names

HF_ACTIVATIONS = {
    "gelu_new": "gelu_new",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def activation(family: str, hf_name: str) -> str:
    if hf_name not in HF_ACTIVATIONS:
        raise ConfigError(f"{family}: activation {hf_name!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[hf_name]


class StateDictReader:
    """Reads a checkpoint key by key, checking each shape; `finish` rejects unused keys.

    Example:
        >>> import torch
        >>> reader = StateDictReader({"a.weight": torch.zeros(2, 3)}, "demo")
        >>> reader.take("a.weight", (2, 3)).shape
        torch.Size([2, 3])
        >>> reader.finish()
    """

    def __init__(
        self,
        state_dict: dict[str, Tensor],
        family: str,
        ignore: Callable[[str], bool] = lambda key: False,
    ) -> None:
        self.state_dict = state_dict
        self.family = family
        self.ignore = ignore
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.state_dict

    def take(self, key: str, shape: Iterable[int]) -> Tensor:
        if key not in self.state_dict:
            close = closest_names(key, self.state_dict)
            raise WeightConversionError(
                f"{self.family}: checkpoint is missing {key!r}" + (f"; closest keys present: {close}" if close else "")
            )
        tensor = self.state_dict[key]
        if tuple(tensor.shape) != tuple(shape):
            raise WeightConversionError(
                f"{self.family}: {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)} from the config"
            )
        self.used.add(key)
        return tensor

    def take_unembed(self, key: str, cfg: ModelConfig) -> dict[str, Tensor]:
        """The unembedding; with tied embeddings the key is optional (checked, then unused)."""
        shape = (cfg.d_vocab, cfg.d_model)
        if not cfg.tie_word_embeddings:
            return {"unembed.w_u": self.take(key, shape)}
        if self.has(key):
            self.take(key, shape)
        return {}

    def finish(self) -> None:
        extra = sorted(k for k in self.state_dict if k not in self.used and not self.ignore(k))
        if extra:
            shown = extra[:10] + (["..."] if len(extra) > 10 else [])
            raise WeightConversionError(
                f"{self.family}: checkpoint has {len(extra)} unexpected keys {shown}; "
                "is this checkpoint from a different architecture?"
            )


def rope_parameters(hf: Any, family: str, params: dict | None = None) -> tuple[float, dict | None, float]:
    """``(rope_theta, scaling, partial_rotary_factor)`` from a transformers 5 ``rope_parameters``
    (or ``params``, one layer type's entry) or a 4.x ``rope_scaling``; unsupported types raise."""
    if params is None:
        params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    params = dict(params)
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    partial = float(params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None, partial
    if rope_type not in ("linear", "llama3"):
        raise ConfigError(f"{family}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
    keys = (
        ("factor",)
        if rope_type == "linear"
        else ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    )
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"{family}: rope scaling {rope_type!r} is missing {missing}")
    return float(theta), {"rope_type": rope_type, **{k: params[k] for k in keys}}, partial


def rotary_dim(head_dim: int, partial: float, family: str) -> int:
    dim = int(head_dim * partial)
    if dim % 2 or dim <= 0:
        raise ConfigError(f"{family}: partial_rotary_factor={partial} gives an odd or empty rotary dimension {dim}")
    return dim


def attention_windows(hf: Any) -> tuple[int | None, list[str] | None]:
    """``(sliding_window, layer_types)``: ``layer_types`` only when layers differ.

    A window without ``layer_types`` (Mistral, Phi-3) applies to every layer.
    """
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if window is None:
        return None, None
    if layer_types is None:
        return window, None
    if all(t == "full_attention" for t in layer_types):
        return None, None
    if all(t == "sliding_attention" for t in layer_types):
        return window, None
    return window, list(layer_types)


def take_attention(
    r: StateDictReader,
    src: str,
    dst: str,
    cfg: ModelConfig,
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
) -> dict[str, Tensor]:
    """Separate ``[out, in]`` query/key/value/output projections (Llama layout) and their biases."""
    d, q_size, kv_size = cfg.d_model, cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    out = {}
    for ours, theirs, size in zip("qkv", names, (q_size, kv_size, kv_size), strict=False):
        out[f"{dst}attn.w_{ours}"] = r.take(f"{src}{theirs}.weight", (size, d))
        if cfg.attn_qkv_bias:
            out[f"{dst}attn.b_{ours}"] = r.take(f"{src}{theirs}.bias", (size,))
    out[f"{dst}attn.w_o"] = r.take(f"{src}{names[3]}.weight", (d, q_size))
    if cfg.attn_out_bias:
        out[f"{dst}attn.b_o"] = r.take(f"{src}{names[3]}.bias", (d,))
    return out


def take_gated_mlp(r: StateDictReader, src: str, dst: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """``gate_proj``/``up_proj``/``down_proj`` (Llama layout) and their biases."""
    d, m = cfg.d_model, cfg.d_mlp
    out = {}
    for ours, theirs, shape in (
        ("w_gate", "gate_proj", (m, d)),
        ("w_in", "up_proj", (m, d)),
        ("w_out", "down_proj", (d, m)),
    ):
        out[f"{dst}mlp.{ours}"] = r.take(f"{src}{theirs}.weight", shape)
        if cfg.mlp_bias:
            out[f"{dst}mlp.b{ours[1:]}"] = r.take(f"{src}{theirs}.bias", (shape[0],))
    return out


def get(hf_config: Any, *names: str, default: Any = None) -> Any:
    """The first attribute of ``hf_config`` among ``names`` that is set."""
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default

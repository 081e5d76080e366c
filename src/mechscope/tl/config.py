"""`HookedTransformerConfig`: TransformerLens' config fields and defaults, mapped onto `ModelConfig`.

A TransformerLens notebook builds ``HookedTransformerConfig(d_model=..., d_head=..., n_layers=...,
n_ctx=..., act_fn=..., normalization_type="LN")`` and passes it to ``HookedTransformer(cfg)``.
The fields, defaults and derived values (``n_heads``, ``d_mlp``, ``d_vocab_out``, ``rotary_dim``,
``attn_scale``, ``initializer_range``, ``n_params``, ``device``) follow TransformerLens 3.9;
`to_model_config` translates them into mechscope's `ModelConfig` and names every field set to a
value mechscope's model cannot compute yet (`UNSUPPORTED`).
"""

from __future__ import annotations

import dataclasses
import pprint
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mechscope.errors import ConfigError
from mechscope.model.config import ModelConfig

SOFTCAP_DISABLED = -1.0
SUPPORTED_ACTIVATIONS = (
    "solu",
    "solu_ln",
    "gelu_new",
    "gelu_fast",
    "silu",
    "relu",
    "gelu",
    "gelu_pytorch_tanh",
    "xielu",
    "relu2",
)
"""TransformerLens' activation names; `ACT_FNS` says which mechscope computes."""
ACT_FNS = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_new",
    "gelu_fast": "gelu_new",
    "silu": "silu",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
}
"""TransformerLens ``act_fn`` -> mechscope ``act_fn`` (``gelu_fast`` is the same tanh approximation)."""
NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)
"""The ``normalization_type`` values mechscope computes (all of TransformerLens'; ``LNPre``/``RMSPre``
pre-norms have no weights, as there)."""
POSITIONS = ("standard", "rotary")
"""The ``positional_embedding_type`` values mechscope computes."""
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}
"""TransformerLens' ``dtype`` strings."""

UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "num_experts": (None, "mixture-of-experts MLPs"),
    "final_rms": (False, "an RMS final norm in a LayerNorm model"),
    "use_logn_attn": (False, "log-n attention scaling"),
    "use_dynamic_ntk_rope": (False, "dynamic NTK RoPE"),
    "use_yarn_rope": (False, "YaRN RoPE"),
    "clip_qkv": (None, "clipped query/key/value"),
    "scale_attn_by_inverse_layer_idx": (False, "attention scaled by the inverse layer index"),
    "attention_dir": ("causal", "bidirectional attention"),
    "post_embedding_ln": (False, "a norm after the embedding"),
    "use_attention_sinks": (False, "attention sinks"),
    "ungroup_grouped_query_attention": (False, "ungrouped keys/values in hook_k/hook_v (phase 2)"),
    "load_in_4bit": (False, "4-bit weights"),
}
"""Field -> (the only value mechscope honours, what a different value would need)."""


@dataclass
class HookedTransformerConfig:
    """TransformerLens' `HookedTransformerConfig` (same fields, defaults and derived values).

    Example:
        >>> cfg = HookedTransformerConfig(d_model=32, d_head=8, n_layers=2, n_ctx=16, d_vocab=50, act_fn="gelu")
        >>> cfg.n_heads, cfg.d_mlp, cfg.d_vocab_out, float(cfg.attn_scale), cfg.normalization_type
        (4, 128, 50, 2.8284271247461903, 'LN')
        >>> mc = cfg.to_model_config()
        >>> mc.normalization_type, mc.attn_scale == float(cfg.attn_scale)
        ('LN', True)
    """

    d_model: int
    d_head: int
    n_layers: int
    n_ctx: int
    n_heads: int = -1
    d_mlp: int | None = None
    d_vocab: int = -1
    device: str | None = None
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    default_prepend_bos: bool = True
    positional_embedding_type: str = "standard"
    n_key_value_heads: int | None = None
    attn_only: bool = False
    gated_mlp: bool = False
    uses_rms_norm: bool = False
    eps: float = 1e-05
    layer_norm_folding: bool = False
    act_fn: str = "relu"
    normalization_type: str | None = "LN"
    num_experts: int | None = None
    experts_per_token: int | None = None
    final_rms: bool = False
    dtype: torch.dtype = torch.float32
    model_name: str = "custom"
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    use_qk_norm: bool = False
    clip_qkv: float | None = None
    use_logn_attn: bool = False
    train_seq_length: int | None = None
    use_dynamic_ntk_rope: bool = False
    use_local_attn: bool = False
    ungroup_grouped_query_attention: bool = False
    original_architecture: str | None = None
    from_checkpoint: bool = False
    checkpoint_index: int | None = None
    checkpoint_label_type: str | None = None
    checkpoint_value: int | None = None
    tokenizer_name: str | None = None
    window_size: int | None = None
    attn_types: list | None = None
    init_mode: str = "gpt2"
    n_devices: int = 1
    attention_dir: str = "causal"
    seed: int | None = None
    initializer_range: float = -1.0
    init_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    d_vocab_out: int = -1
    parallel_attn_mlp: bool = False
    rotary_dim: int | None = None
    n_params: int | None = None
    use_hook_tokens: bool = False
    tokenizer_prepends_bos: bool | None = None
    post_embedding_ln: bool = False
    rotary_base: float | int = 10000
    rotary_base_local: float | int | None = None
    rotary_scaling_factor: float = 1.0
    trust_remote_code: bool = False
    rotary_adjacent_pairs: bool = False
    load_in_4bit: bool = False
    quantization_method: str | None = None
    relative_attention_max_distance: int | None = None
    relative_attention_num_buckets: int | None = None
    decoder_start_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_normalization_before_and_after: bool = False
    attn_scores_soft_cap: float = SOFTCAP_DISABLED
    output_logits_soft_cap: float = SOFTCAP_DISABLED
    use_NTK_by_parts_rope: bool = False
    NTK_by_parts_low_freq_factor: float = 1.0
    NTK_by_parts_high_freq_factor: float = 4.0
    NTK_by_parts_factor: float = 8.0
    NTK_original_ctx_len: int = 8192
    use_yarn_rope: bool = False
    yarn_factor: float = 1.0
    yarn_attention_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_original_max_position_embeddings: int = 4096
    yarn_truncate: bool = True
    yarn_global_attn_only: bool = False
    use_attention_sinks: bool = False
    norm_topk_prob: bool = False

    def __post_init__(self) -> None:
        if self.n_heads == -1:
            if self.d_model % self.d_head:
                raise ConfigError(f"d_model ({self.d_model}) must be divisible by d_head ({self.d_head})")
            self.n_heads = self.d_model // self.d_head
        if self.d_mlp is None:
            self.d_mlp = self.d_model * 4
        if self.seed is not None:
            self.set_seed_everywhere(self.seed)
        if self.use_local_attn and (self.window_size is None or self.attn_types is None):
            raise ConfigError("use_local_attn needs window_size and attn_types (one 'global'/'local' per layer)")
        if not self.attn_only and self.act_fn not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"act_fn={self.act_fn!r} must be one of {list(SUPPORTED_ACTIVATIONS)}")
        if self.initializer_range < 0:
            self.initializer_range = 0.8 / np.sqrt(self.d_model) if self.init_mode == "gpt2" else 1.0
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        if self.positional_embedding_type == "rotary" and self.rotary_dim is None:
            self.rotary_dim = self.d_head
        if (self.num_experts is None) != (self.experts_per_token is None):
            raise ConfigError("num_experts and experts_per_token must be set together")
        self.n_params = self.n_layers * self.d_model * self.d_head * self.n_heads * 4
        if not self.attn_only:
            mlp = self.d_model * self.d_mlp * (2 + self.gated_mlp)
            if self.num_experts:
                mlp = (mlp + self.d_model) * self.num_experts
            self.n_params += self.n_layers * mlp
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.n_devices > 1 and torch.cuda.device_count() < self.n_devices:
            raise ConfigError(
                f"n_devices={self.n_devices} needs that many CUDA devices, found {torch.cuda.device_count()}"
            )
        if self.use_attn_scale and self.attn_scale == -1.0:
            self.attn_scale = np.sqrt(self.d_head)
        if self.default_prepend_bos not in (True, False):
            raise ConfigError(f"default_prepend_bos must be True or False, got {self.default_prepend_bos!r}")

    # ------------------------------------------------------------------ TransformerLens helpers
    @classmethod
    def unwrap(cls, config: dict | HookedTransformerConfig) -> HookedTransformerConfig:
        """A config from a dict, or the config itself."""
        return cls.from_dict(config) if isinstance(config, dict) else config

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> HookedTransformerConfig:
        """A config from a dict of its fields (missing ones take their defaults).

        Example:
            >>> cfg = HookedTransformerConfig.from_dict({"d_model": 8, "d_head": 4, "n_layers": 1, "n_ctx": 4,
            ...                                          "d_vocab": 5, "act_fn": "gelu", "device": "cpu"})
            >>> cfg.n_heads, cfg.d_mlp
            (2, 32)
        """
        return cls(**config_dict)

    def to_dict(self) -> dict[str, Any]:
        """Every field (and the derived ``n_params``) by name; as in TransformerLens this is the
        instance's own ``__dict__``, so changing the dict changes the config."""
        return self.__dict__

    def __repr__(self) -> str:
        return "HookedTransformerConfig:\n" + pprint.pformat(self.to_dict())

    def set_seed_everywhere(self, seed: int) -> None:
        """Seed torch, Python's ``random`` and NumPy's global generator with ``seed`` (done on
        construction when ``seed`` is set)."""
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

    def is_layer_norm_activation(self) -> bool:
        """Whether ``act_fn`` is followed by a layer norm inside the MLP (``solu_ln``, or any ``*_ln``)."""
        return self.act_fn is not None and self.act_fn.endswith("_ln")

    # ------------------------------------------------------------------ mechscope
    def unsupported(self) -> dict[str, str]:
        """Each field set to a value mechscope's model cannot compute yet, with what it would need.

        Example:
            >>> cfg = HookedTransformerConfig(d_model=8, d_head=4, n_layers=1, n_ctx=4, d_vocab=5, act_fn="solu_ln")
            >>> list(cfg.unsupported())
            ['act_fn']
        """
        out = {
            name: f"{name}={getattr(self, name)!r}: {what}"
            for name, (ok, what) in UNSUPPORTED.items()
            if getattr(self, name) != ok
        }
        if not self.attn_only and self.act_fn not in ACT_FNS:
            out["act_fn"] = f"act_fn={self.act_fn!r} (mechscope computes {list(ACT_FNS)})"
        if self.normalization_type not in NORMS:
            out["normalization_type"] = f"normalization_type={self.normalization_type!r}; choose one of {list(NORMS)}"
        if self.positional_embedding_type not in POSITIONS:
            out["positional_embedding_type"] = (
                f"positional_embedding_type={self.positional_embedding_type!r}; mechscope computes {list(POSITIONS)}"
            )
        if self.d_vocab_out != self.d_vocab:
            out["d_vocab_out"] = f"d_vocab_out={self.d_vocab_out} differs from d_vocab={self.d_vocab}"
        return out

    def to_model_config(self) -> ModelConfig:
        """The `ModelConfig` computing the same model; `ConfigError` names what it cannot honour.

        Example:
            >>> mc = HookedTransformerConfig(d_model=10, d_head=5, n_layers=1, n_ctx=8, d_vocab=7).to_model_config()
            >>> mc.n_heads, mc.d_mlp, mc.act_fn, mc.positional_embedding_type
            (2, 40, 'relu', 'standard')
        """
        problems = self.unsupported()
        if problems:
            raise ConfigError("mechscope cannot build this model yet: " + "; ".join(problems.values()))
        if self.d_vocab <= 0:
            raise ConfigError("d_vocab=-1 is inferred from a tokenizer: pass one to HookedTransformer(cfg, tokenizer)")
        return ModelConfig(**model_config_fields(self))


def model_config_fields(cfg: HookedTransformerConfig) -> dict[str, Any]:
    """The `ModelConfig` keyword arguments equivalent to ``cfg``."""
    rope_scaling = None
    if cfg.use_NTK_by_parts_rope:
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.NTK_by_parts_factor,
            "low_freq_factor": cfg.NTK_by_parts_low_freq_factor,
            "high_freq_factor": cfg.NTK_by_parts_high_freq_factor,
            "original_max_position_embeddings": cfg.NTK_original_ctx_len,
        }
    elif cfg.rotary_scaling_factor != 1.0:
        rope_scaling = {"rope_type": "linear", "factor": cfg.rotary_scaling_factor}
    window, layer_types = None, None
    if cfg.use_local_attn:
        window = cfg.window_size
        layer_types = ["sliding_attention" if t == "local" else "full_attention" for t in cfg.attn_types]
    return dict(
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        d_head=cfg.d_head,
        d_mlp=cfg.d_mlp,
        d_vocab=cfg.d_vocab,
        n_ctx=cfg.n_ctx,
        n_key_value_heads=cfg.n_key_value_heads,
        act_fn=ACT_FNS.get(cfg.act_fn, "relu"),
        gated_mlp=cfg.gated_mlp,
        normalization_type=cfg.normalization_type,
        norm_eps=cfg.eps,
        positional_embedding_type=cfg.positional_embedding_type,
        rotary_dim=cfg.rotary_dim,
        rotary_base=float(cfg.rotary_base),
        rope_scaling=rope_scaling,
        rotary_base_local=None if cfg.rotary_base_local is None else float(cfg.rotary_base_local),
        rotary_interleaved=cfg.rotary_adjacent_pairs,
        attn_scale=float(cfg.attn_scale) if cfg.use_attn_scale else 1.0,
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=True,
        tie_word_embeddings=cfg.tie_word_embeddings,
        sliding_window=window,
        layer_types=layer_types,
        qk_norm="head" if cfg.use_qk_norm else None,
        post_norm=cfg.use_normalization_before_and_after,
        attn_scores_soft_cap=None if cfg.attn_scores_soft_cap <= 0 else cfg.attn_scores_soft_cap,
        output_logits_soft_cap=None if cfg.output_logits_soft_cap <= 0 else cfg.output_logits_soft_cap,
        attn_only=cfg.attn_only,
        parallel_attn_mlp=cfg.parallel_attn_mlp,
        default_prepend_bos=cfg.default_prepend_bos,
        model_name=cfg.model_name,
        use_attn_result=cfg.use_attn_result,
        use_split_qkv_input=cfg.use_split_qkv_input,
        use_attn_in=cfg.use_attn_in,
        use_hook_mlp_in=cfg.use_hook_mlp_in,
        extra={"transformer_lens_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dtype"}},
    )

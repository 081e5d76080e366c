"""Shared helpers for family adapters: strict state-dict reading and HF config access."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from mechscope.errors import ConfigError, WeightConversionError
from mechscope.hooks import closest_names
from mechscope.model.config import ModelConfig

HF_ACTIVATIONS = {
    "gelu_new": "gelu_new",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
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


def get(hf_config: Any, *names: str, default: Any = None) -> Any:
    """The first attribute of ``hf_config`` among ``names`` that is set."""
    for name in names:
        value = getattr(hf_config, name, None)
        if value is not None:
            return value
    return default

"""Placing a model's blocks over several devices (pipeline placement, one forward at a time).

A device map names, for each device, the layers it holds: ``{"cuda:0": range(0, 15),
"cuda:1": range(15, 30)}``. The embedding goes with layer 0; the final norm and unembedding go
with the last layer (or with the embedding when the two are tied). The forward pass moves the
residual stream, positions and masks to each block's device as it reaches it, so hooks see each
activation on the device of the block that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import torch

from mechscope.errors import ConfigError

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer

DeviceMap = Literal["auto"] | Mapping[str | torch.device, Iterable[int]]


def _device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device_map names an invalid device {name!r}; use e.g. 'cpu' or 'cuda:0'") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device_map names {device} but only {count} CUDA devices are visible")
    return device


def layer_devices(device_map: DeviceMap, n_layers: int) -> list[torch.device]:
    """The device of each layer; every layer must be named exactly once.

    ``"auto"`` splits the layers into equal contiguous ranges over the visible CUDA devices
    (all on CPU when there are none).

    Example:
        >>> [d.type for d in layer_devices({"cpu": range(0, 2), "meta": [2]}, 3)]
        ['cpu', 'cpu', 'meta']
    """
    if device_map == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            return [torch.device("cpu")] * n_layers
        return [torch.device("cuda", layer * count // n_layers) for layer in range(n_layers)]
    if not isinstance(device_map, Mapping) or not device_map:
        raise ConfigError(
            f"device_map must be 'auto' or a mapping from device to layers, e.g. {{'cuda:0': range(0, {n_layers})}}"
        )
    devices: list[torch.device | None] = [None] * n_layers
    for name, layers in device_map.items():
        device = _device(name)
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < n_layers:
                raise ConfigError(f"device_map gives {device} layer {layer!r}; layers are 0..{n_layers - 1}")
            if devices[layer] is not None:
                raise ConfigError(f"device_map gives layer {layer} to both {devices[layer]} and {device}")
            devices[layer] = device
    missing = [layer for layer, device in enumerate(devices) if device is None]
    if missing:
        raise ConfigError(f"device_map places no device for layers {missing}; every layer 0..{n_layers - 1} needs one")
    return devices


def place(model: HookedTransformer, device_map: DeviceMap) -> HookedTransformer:
    """Move each block to its device (see the module docstring) and return the model.

    Example:
        >>> _ = place(model, {"cpu": range(model.cfg.n_layers)})
        >>> model.blocks[0].attn.w_q.device.type
        'cpu'
    """
    devices = layer_devices(device_map, model.cfg.n_layers)
    first, last = devices[0], devices[-1]
    model.embed.to(first)
    if model.cfg.positional_embedding_type == "standard":
        model.pos_embed.to(first)
    for block, device in zip(model.blocks, devices, strict=False):
        block.to(device)
    head = first if model.cfg.tie_word_embeddings else last
    if model.ln_final is not None:
        model.ln_final.to(head)
    model.unembed.to(head)
    if model.cfg.tie_word_embeddings:
        model.unembed.w_u = model.embed.W_E
    return model

"""Probe datasets: activations of chosen hooks at chosen positions, with the sequence each row came from.

`collect_activations` runs the model on token batches (stopping after the last block it
needs) and keeps one row per selected position; `ProbeData.labels_for` turns labels per token
(``[batch, pos, ...]``) or per sequence (``[batch, ...]``) into one label row per activation
row; `split_by_sequence` splits rows so that no sequence is on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.names import layer_of
from mechscope.probing.linear import group_split


@dataclass
class ProbeData:
    """Activations of one or more hooks at selected positions.

    Example:
        >>> data = collect_activations(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), ["blocks.0.hook_resid_post"])
        >>> data["blocks.0.hook_resid_post"].shape, data.sequence.tolist(), data.position.tolist()
        (torch.Size([6, 32]), [0, 0, 0, 1, 1, 1], [0, 1, 2, 0, 1, 2])
    """

    activations: dict[str, Float[Tensor, "batch d_model"]]
    """Hook name -> ``[row, width]`` (trailing axes of the hook flattened)."""
    sequence: Int[Tensor, " batch"]
    """Index of each row's sequence in the token batch."""
    position: Int[Tensor, " batch"]
    """Position of each row in its sequence."""

    def __getitem__(self, hook: str) -> Tensor:
        if hook not in self.activations:
            raise InputError(f"no activations of {hook!r}; collected: {sorted(self.activations)}")
        return self.activations[hook]

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def labels_for(self, labels: Tensor) -> Tensor:
        """One label row per activation row, from labels per token ``[batch, pos, *target]`` or
        per sequence ``[batch, *target]`` (a per-sequence tensor whose second axis could also be
        positions is read per token when its shape matches the token batch: pass ``[batch, 1]``
        labels otherwise).

        Example:
            >>> data = ProbeData({}, torch.tensor([0, 1, 1]), torch.tensor([2, 0, 1]))
            >>> data.labels_for(torch.tensor([[5, 6, 7], [8, 9, 10]])).tolist()
            [7, 8, 9]
            >>> data.labels_for(torch.tensor([3, 4])).tolist()
            [3, 4, 4]
        """
        n_seq = int(self.sequence.max()) + 1 if len(self) else 0
        if labels.shape[0] < n_seq:
            raise InputError(f"labels cover {labels.shape[0]} sequences, the activations {n_seq}")
        labels = labels.to(self.sequence.device)
        per_token = labels.dim() >= 2 and labels.shape[1] > int(self.position.max())
        if per_token:
            return labels[self.sequence, self.position]
        return labels[self.sequence]


@torch.no_grad()
def collect_activations(
    model,
    tokens: Int[Tensor, "batch pos"],
    hooks: str | Sequence[str],
    positions: Bool[Tensor, "batch pos"] | None = None,
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    progress: bool = False,
) -> ProbeData:
    """Run ``model`` on ``tokens`` and keep the activations of ``hooks`` at ``positions``.

    ``positions`` (default: every position, or every unmasked one with ``attention_mask``)
    selects the rows. The forward stops after the deepest block a hook lives in. Rows are
    stored on ``device`` (CPU by default, so long collections fit).

    Example:
        >>> keep = torch.tensor([[False, True, True]])
        >>> data = collect_activations(model, torch.tensor([[1, 2, 3]]), "blocks.1.mlp.hook_post", keep)
        >>> data["blocks.1.mlp.hook_post"].shape
        torch.Size([2, 64])
    """
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks:
        raise InputError("name at least one hook to collect")
    model.hook_names(hooks)  # raises on an unknown name, naming the closest valid ones
    if tokens.dim() != 2:
        raise InputError(f"tokens must be [batch, pos], got {tuple(tokens.shape)}")
    if positions is None:
        positions = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if positions.shape != tokens.shape:
        raise InputError(f"positions {tuple(positions.shape)} must match tokens {tuple(tokens.shape)}")
    layers = [layer_of(h) for h in hooks]
    stop = None if any(layer is None for layer in layers) else max(layers) + 1
    if stop is not None and stop >= model.cfg.n_layers:
        stop = None
    model_device = next(model.parameters()).device
    rows: dict[str, list[Tensor]] = {h: [] for h in hooks}
    sequence, position = [], []
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="activations", disable=not progress, leave=False):
        batch = tokens[start : start + batch_size].to(model_device)
        keep = positions[start : start + batch_size].to(model_device)
        mask = None if attention_mask is None else attention_mask[start : start + batch_size].to(model_device)
        _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop, attention_mask=mask,
                                        return_type=None)  # fmt: skip
        for hook in hooks:
            act = cache[hook]  # [batch, pos, ...]
            rows[hook].append(act[keep].flatten(1).to(device))
        seq, pos = keep.nonzero(as_tuple=True)
        sequence.append((seq + start).to(device))
        position.append(pos.to(device))
    return ProbeData({h: torch.cat(r) for h, r in rows.items()}, torch.cat(sequence), torch.cat(position))


def split_by_sequence(
    sequence: Int[Tensor, " batch"], test_fraction: float = 0.2, seed: int = 0
) -> tuple[Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Row indices ``(train, test)`` with a random ``test_fraction`` of the *sequences* in test:
    no position of a test text is seen in training.

    Example:
        >>> train, test = split_by_sequence(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]), 0.4)
        >>> len(train), len(test), set(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])[test].tolist()).isdisjoint(
        ...     torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])[train].tolist())
        (6, 4, True)
    """
    if not 0 < test_fraction < 1:
        raise InputError(f"test_fraction must be in (0, 1), got {test_fraction}")
    held = group_split(sequence.cpu(), test_fraction, seed)
    return (~held).nonzero()[:, 0], held.nonzero()[:, 0]

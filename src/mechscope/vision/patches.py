"""Positions of a vision model and where they sit in the image.

A vision model's position ``pos`` is its class token (``pos < n_prefix``: position 0 of ViT and
CLIP; SigLIP has none) or the image patch at grid ``(row, col)``, ``pos = n_prefix + row *
n_cols + col`` (row-major from the top-left, as the patch embedding reads the image). `PatchGrid`
converts between the two and maps patches to pixel boxes; `to_patches` reshapes any tensor with a
``pos`` axis into the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError


@dataclass(frozen=True)
class PatchGrid:
    """The patch grid of a vision model's input.

    Example:
        >>> grid = PatchGrid(image_size=32, patch_size=8, n_prefix=1)
        >>> grid.n_rows, grid.position(1, 2), grid.cell(7), grid.box(7)
        (4, 7, (1, 2), (8, 16, 16, 24))
    """

    image_size: int
    """Side of the (square) model input in pixels."""
    patch_size: int
    """Side of one patch in pixels."""
    n_prefix: int = 0
    """Positions before the first patch (1 with a class token)."""

    @classmethod
    def of(cls, model) -> PatchGrid:
        """The grid of a vision model (from its config)."""
        cfg = model.cfg
        if cfg.image_size is None:
            raise InputError(f"{cfg.model_name} is a text model: it has no patch grid")
        return cls(cfg.image_size, cfg.patch_size, cfg.n_prefix_tokens)

    @property
    def n_rows(self) -> int:
        """Patches per row (and per column: images are square)."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """Patches per image."""
        return self.n_rows**2

    @property
    def n_positions(self) -> int:
        """Positions of the model's input: the class token (if any) and every patch."""
        return self.n_prefix + self.n_patches

    def position(self, row: int, col: int) -> int:
        """The position of the patch at ``(row, col)``."""
        if not (0 <= row < self.n_rows and 0 <= col < self.n_rows):
            raise InputError(f"patch ({row}, {col}) is outside the {self.n_rows}x{self.n_rows} grid")
        return self.n_prefix + row * self.n_rows + col

    def cell(self, pos: int) -> tuple[int, int]:
        """``(row, col)`` of the patch at ``pos``; the class token has none."""
        if not self.n_prefix <= pos < self.n_positions:
            kind = "the class token" if 0 <= pos < self.n_prefix else "out of range"
            raise InputError(f"position {pos} is {kind}; patches are positions {self.n_prefix}..{self.n_positions - 1}")
        return divmod(pos - self.n_prefix, self.n_rows)

    def box(self, pos: int) -> tuple[int, int, int, int]:
        """Pixel box ``(top, left, bottom, right)`` (bottom/right exclusive) of the patch at ``pos``."""
        row, col = self.cell(pos)
        p = self.patch_size
        return row * p, col * p, (row + 1) * p, (col + 1) * p

    def positions_in(self, top: int, left: int, bottom: int, right: int) -> list[int]:
        """The positions of every patch overlapping the pixel box (bottom/right exclusive).

        Example:
            >>> PatchGrid(32, 8, 1).positions_in(0, 0, 9, 8)
            [1, 5]
        """
        if not (0 <= top < bottom <= self.image_size and 0 <= left < right <= self.image_size):
            raise InputError(f"box ({top}, {left}, {bottom}, {right}) is not inside the {self.image_size}px image")
        p = self.patch_size
        rows = range(top // p, (bottom - 1) // p + 1)
        cols = range(left // p, (right - 1) // p + 1)
        return [self.position(r, c) for r in rows for c in cols]

    def to_patches(self, values: Tensor, dim: int = -1) -> Float[Tensor, "... n_rows n_cols"]:
        """``values`` with its ``pos`` axis ``dim`` (every position, class token included) replaced
        by the patch grid ``[..., n_rows, n_cols]`` (moved last); the class token is dropped.

        Example:
            >>> PatchGrid(8, 4, 1).to_patches(torch.arange(5.0)).tolist()
            [[1.0, 2.0], [3.0, 4.0]]
        """
        if values.shape[dim] != self.n_positions:
            raise InputError(
                f"axis {dim} has {values.shape[dim]} entries; the grid has {self.n_positions} positions "
                f"({self.n_prefix} class token(s) and {self.n_patches} patches)"
            )
        values = values.movedim(dim, -1)[..., self.n_prefix :]
        return values.unflatten(-1, (self.n_rows, self.n_rows))


def to_patches(model, values: Tensor, dim: int = -1) -> Tensor:
    """`PatchGrid.to_patches` with the grid of ``model``.

    Example:
        >>> from mechscope.vision.tiny import random_vit
        >>> vit = random_vit()
        >>> _, cache = vit.run_with_cache(torch.rand(2, 3, 16, 16), names_filter=["blocks.1.hook_resid_post"])
        >>> to_patches(vit, cache["resid_post", 1].norm(dim=-1)).shape  # [batch, n_rows, n_cols]
        torch.Size([2, 4, 4])
    """
    return PatchGrid.of(model).to_patches(values, dim)


def upsample(grid: Float[Tensor, "... n_rows n_cols"], image_size: int) -> Float[Tensor, "... height width"]:
    """A per-patch grid repeated to one value per pixel (nearest neighbour), for overlays.

    Example:
        >>> upsample(torch.tensor([[1.0, 2.0]]), 4).shape
        torch.Size([4, 4])
    """
    rows, cols = grid.shape[-2:]
    if image_size % rows or image_size % cols:
        raise InputError(f"a {rows}x{cols} grid does not tile a {image_size}px image")
    return grid.repeat_interleave(image_size // rows, -2).repeat_interleave(image_size // cols, -1)

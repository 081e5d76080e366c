"""The patch grid: positions, cells and pixel boxes agree with the patch embedding."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.vision import PatchGrid, to_patches, upsample


def test_positions_cells_and_boxes_round_trip():
    grid = PatchGrid(image_size=16, patch_size=4, n_prefix=1)
    for pos in range(1, grid.n_positions):
        row, col = grid.cell(pos)
        assert grid.position(row, col) == pos
        top, left, bottom, right = grid.box(pos)
        assert grid.positions_in(top, left, bottom, right) == [pos]
    assert grid.positions_in(3, 3, 5, 5) == [1, 2, 5, 6]
    with pytest.raises(ms.InputError, match="class token"):
        grid.cell(0)
    with pytest.raises(ms.InputError, match="outside the 4x4 grid"):
        grid.position(4, 0)


def test_patch_positions_read_their_image_patch(clip):
    """Changing one patch's pixels changes the embedding at exactly that position."""
    model = clip.vision
    grid = PatchGrid.of(model)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    pos = grid.position(2, 1)
    top, left, bottom, right = grid.box(pos)
    y = x.clone()
    y[..., top:bottom, left:right] += 1.0
    with torch.no_grad():
        _, a = model.run_with_cache(x, names_filter=["hook_embed"])
        _, b = model.run_with_cache(y, names_filter=["hook_embed"])
    changed = (a["hook_embed"] - b["hook_embed"]).abs().amax(-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [pos]


def test_to_patches_and_upsample(clip):
    values = torch.arange(17.0).expand(2, 17)
    grid = to_patches(clip.vision, values)
    assert grid.shape == (2, 4, 4) and grid[0, 1, 2].item() == 1 + 4 + 2
    assert upsample(grid, 16)[0, 5, 9].item() == grid[0, 1, 2].item()
    with pytest.raises(ms.InputError, match="17 positions"):
        to_patches(clip.vision, torch.zeros(16))
    with pytest.raises(ms.InputError, match="text model"):
        PatchGrid.of(clip.text)

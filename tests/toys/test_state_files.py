"""A damaged or foreign toy state file is a LoadError naming its path (never torch's pickle hint)."""

from __future__ import annotations

import fractions

import pytest
import torch

from mechscope.errors import LoadError
from mechscope.toys import GrokkingConfig, train_grokking
from mechscope.toys.checkpoint import load_state, save_state


def damage(kind: str, path) -> None:
    if kind == "truncated":
        save_state(path.parent, {"lr": 0.1}, 3, history=[1.0])
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "garbage":
        path.write_bytes(b"\x80\x04 not a state file at all")
    elif kind == "foreign pickle":  # a class weights_only refuses: torch suggests weights_only=False
        torch.save({"config": fractions.Fraction(1, 3)}, path)
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign pickle", "not a dict"])
def test_damaged_state_files_name_their_path(tmp_path, kind):
    path = tmp_path / "state.pt"
    damage(kind, path)
    with pytest.raises(LoadError, match="training state") as info:
        load_state(tmp_path, {"lr": 0.1})
    message = str(info.value)
    assert str(path) in message and "afresh" in message
    assert "weights_only" not in message and "trust" not in message


@pytest.mark.parametrize("kind", ["garbage", "foreign pickle"])
def test_a_damaged_grokking_state_names_its_path(tmp_path, kind):
    path = tmp_path / "state.pt"
    damage(kind, path)
    with pytest.raises(LoadError, match="is not a (readable )?training state") as info:
        train_grokking(GrokkingConfig.quick(n_epochs=2), tmp_path, progress=False)
    assert str(path) in str(info.value) and "weights_only" not in str(info.value)

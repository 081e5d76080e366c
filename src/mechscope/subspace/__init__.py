"""Subspace interventions: subspace activation patching, distributed alignment search (DAS), the
interpretability-illusion check and steering.

Example:
    >>> from mechscope.subspace import subspace_patch
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    >>> subspace_patch(model, clean, corrupted, torch.randn(2, 32), lambda logits: logits[:, -1, 7]).shape
    torch.Size([3, 4, 2])
"""

from mechscope.subspace.basis import as_bases, coordinates, interchange, orthonormal_basis, split_subspace
from mechscope.subspace.das import DASConfig, InterchangeScores, LearnedSubspace, interchange_scores, train_das
from mechscope.subspace.illusion import IllusionReport, IllusionRow, head_readers, illusion_check
from mechscope.subspace.intervention import InterchangeData, InterchangeRun, Predicts
from mechscope.subspace.patch import SubspaceSite, subspace_hooks, subspace_patch
from mechscope.subspace.steer import mean_difference, steer, steering_hooks

__all__ = [
    "DASConfig",
    "IllusionReport",
    "IllusionRow",
    "InterchangeData",
    "InterchangeRun",
    "InterchangeScores",
    "LearnedSubspace",
    "Predicts",
    "SubspaceSite",
    "as_bases",
    "coordinates",
    "head_readers",
    "illusion_check",
    "interchange",
    "interchange_scores",
    "mean_difference",
    "orthonormal_basis",
    "split_subspace",
    "steer",
    "steering_hooks",
    "subspace_hooks",
    "subspace_patch",
    "train_das",
]

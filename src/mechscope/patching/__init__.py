"""Localising behaviour: activation patching, path patching, attribution patching (AtP, AtP*).

Example:
    >>> from mechscope.patching import activation_patch
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    >>> activation_patch(model, clean, corrupted, lambda logits: logits[:, -1, 7], "resid_pre").shape
    torch.Size([3, 4])
"""

from mechscope.patching.activation import SITES, Site, ablate, activation_patch, get_site, run_patches
from mechscope.patching.atp_star import AtPStarResult, FalseNegativeEstimate, atp_star
from mechscope.patching.attribution import attribution_patch
from mechscope.patching.metrics import KLDivergence, LogitDiff, Normalized, ProbDiff
from mechscope.patching.path import path_patch

__all__ = [
    "SITES",
    "AtPStarResult",
    "FalseNegativeEstimate",
    "KLDivergence",
    "LogitDiff",
    "Normalized",
    "ProbDiff",
    "Site",
    "ablate",
    "activation_patch",
    "atp_star",
    "attribution_patch",
    "get_site",
    "path_patch",
    "run_patches",
]

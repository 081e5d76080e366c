"""Localising behaviour: activation patching, path patching, attribution patching (AtP, AtP*).

Example:
    >>> from mechscope.patching import activation_patch
    >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    >>> activation_patch(model, clean, corrupted, lambda logits: logits[:, -1, 7], "resid_pre").shape
    torch.Size([3, 4])
"""

from mechscope.names import SITES, Site
from mechscope.patching.activation import ablate, activation_patch, get_site
from mechscope.patching.atp_star import AtPStarResult, FalseNegativeEstimate, atp_star
from mechscope.patching.attribution import attribution_patch
from mechscope.patching.engine import BaseRun, SweepOptions, base_run, run_patches
from mechscope.patching.metrics import KLDivergence, LogitDiff, Normalized, ProbDiff
from mechscope.patching.path import path_patch

__all__ = [
    "SITES",
    "AtPStarResult",
    "BaseRun",
    "FalseNegativeEstimate",
    "KLDivergence",
    "LogitDiff",
    "Normalized",
    "ProbDiff",
    "Site",
    "SweepOptions",
    "ablate",
    "activation_patch",
    "atp_star",
    "attribution_patch",
    "base_run",
    "get_site",
    "path_patch",
    "run_patches",
]

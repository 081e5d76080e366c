"""Toy models that reproduce classic results: grokking, superposition, induction heads.

- `mechscope.toys.modular`: modular addition trained to grok, with checkpoints and the progress
  measures; `mechscope.toys.fourier`: the Fourier tools that reverse-engineer it.
- `mechscope.toys.superposition`: the ReLU-output toy models, batched over instances, with
  feature geometry and the two-feature phase diagram.
- `mechscope.toys.induction`: a two-layer attention-only transformer that forms induction heads,
  with head scores, composition scores and their causal check.
- `mechscope.toys.checkpoint`: atomic, resumable training state (used by superposition and
  induction training).

``mechscope toys grokking|superposition|induction`` runs each and writes an HTML report.

Example:
    >>> from mechscope import toys
    >>> toys.GrokkingConfig().p, toys.InductionConfig().n_layers
    (113, 2)
"""

from mechscope.toys import fourier
from mechscope.toys.induction import (
    InductionConfig,
    head_scores,
    induction_summary,
    k_composition_ablation,
    train_induction,
)
from mechscope.toys.modular import (
    GrokkingConfig,
    GrokkingRun,
    analyse_model,
    load_grokking_run,
    modular_addition_data,
    progress_measures,
    train_grokking,
)
from mechscope.toys.superposition import (
    SuperpositionTraining,
    ToyModel,
    feature_dimensionality,
    phase_diagram,
    train_toy_model,
)

__all__ = [
    "GrokkingConfig",
    "GrokkingRun",
    "InductionConfig",
    "SuperpositionTraining",
    "ToyModel",
    "analyse_model",
    "feature_dimensionality",
    "fourier",
    "head_scores",
    "induction_summary",
    "k_composition_ablation",
    "load_grokking_run",
    "modular_addition_data",
    "phase_diagram",
    "progress_measures",
    "train_grokking",
    "train_induction",
    "train_toy_model",
]

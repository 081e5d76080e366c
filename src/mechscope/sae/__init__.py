"""Sparse autoencoders: architectures, activation store, trainer, evaluation, file formats, splicing,
and feature patching, ablation and attribution.

Example:
    >>> from mechscope.sae import SAEConfig, make_sae
    >>> sae = make_sae(SAEConfig(d_in=32, d_sae=128, architecture="topk", k=8,
    ...                          hook_name="blocks.1.hook_resid_post"))
    >>> _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    >>> sae.encode(cache["blocks.1.hook_resid_post"]).shape
    torch.Size([1, 4, 128])
"""

from mechscope.sae import architectures
from mechscope.sae.architectures import BatchTopKSAE, GatedSAE, JumpReLUSAE, StandardSAE, TopKSAE
from mechscope.sae.base import SAE, TrainStepOutput, make_sae
from mechscope.sae.config import SAEConfig
from mechscope.sae.evaluate import SAEEvaluation, evaluate_sae
from mechscope.sae.features import FeatureSite, acts_name, feature_ablate, feature_attribution_patch, feature_patch
from mechscope.sae.formats import load_sae, save_sae
from mechscope.sae.registry import SAE_REGISTRY, register_sae, registered_architectures, sae_class
from mechscope.sae.splice import run_with_cache_with_saes, run_with_saes, splice, spliced_hooks
from mechscope.sae.store import ActivationStore
from mechscope.sae.trainer import SAETrainer, TensorSource, TrainConfig, geometric_median, train_sae

__all__ = [
    "ActivationStore",
    "FeatureSite",
    "acts_name",
    "feature_ablate",
    "feature_attribution_patch",
    "feature_patch",
    "SAEEvaluation",
    "evaluate_sae",
    "load_sae",
    "run_with_cache_with_saes",
    "run_with_saes",
    "save_sae",
    "splice",
    "spliced_hooks",
    "SAE",
    "SAE_REGISTRY",
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "SAEConfig",
    "SAETrainer",
    "StandardSAE",
    "TensorSource",
    "TopKSAE",
    "TrainConfig",
    "TrainStepOutput",
    "architectures",
    "geometric_median",
    "make_sae",
    "register_sae",
    "registered_architectures",
    "sae_class",
    "train_sae",
]

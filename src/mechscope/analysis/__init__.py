"""Reading mechanisms: logit attribution, logit lens, head detectors, weight-space analysis, MLP linearisation.

Example:
    >>> from mechscope.analysis import direct_logit_attribution, induction_scores, top_heads
    >>> logits, cache = model.run_with_cache(tokens)
    >>> direct_logit_attribution(cache, answer=3, by="layer").labels[:3]
    ['embed', 'pos_embed', '0_attn_out']
"""

from mechscope.analysis.attribution import (
    Attribution,
    LogitLens,
    LogitTarget,
    apply_final_norm,
    direct_logit_attribution,
    logit_lens,
    logit_target,
)
from mechscope.analysis.factored import FactoredMatrix
from mechscope.analysis.heads import (
    COPY_SUPPRESSION_TEXT,
    attention_patterns,
    copy_suppression_scores,
    detect_head,
    duplicate_token_scores,
    duplicate_token_target,
    induction_scores,
    induction_target,
    previous_token_scores,
    previous_token_target,
    repeated_random_tokens,
    score_patterns,
    top_heads,
)
from mechscope.analysis.mlp import MLPLinearisation, activation_derivative, linearise_mlp
from mechscope.analysis.weights import (
    HeadWeights,
    SingularDirection,
    composition_scores,
    head_weights,
    ov_copying_scores,
    svd_top_tokens,
)

__all__ = [
    "COPY_SUPPRESSION_TEXT",
    "Attribution",
    "FactoredMatrix",
    "HeadWeights",
    "LogitLens",
    "LogitTarget",
    "MLPLinearisation",
    "SingularDirection",
    "activation_derivative",
    "apply_final_norm",
    "attention_patterns",
    "composition_scores",
    "copy_suppression_scores",
    "detect_head",
    "direct_logit_attribution",
    "duplicate_token_scores",
    "duplicate_token_target",
    "head_weights",
    "induction_scores",
    "induction_target",
    "linearise_mlp",
    "logit_lens",
    "logit_target",
    "ov_copying_scores",
    "previous_token_scores",
    "previous_token_target",
    "repeated_random_tokens",
    "score_patterns",
    "svd_top_tokens",
    "top_heads",
]

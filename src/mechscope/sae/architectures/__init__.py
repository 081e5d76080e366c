"""SAE architectures, one file each; importing this package registers them in `SAE_REGISTRY`.

Transcoders are not a separate architecture: any of these with ``hook_name_out`` (and
``d_out``) set reads one hook and predicts another, optionally with ``skip_connection``.
"""

from mechscope.sae.architectures.batchtopk import BatchTopKSAE
from mechscope.sae.architectures.gated import GatedSAE
from mechscope.sae.architectures.jumprelu import JumpReLUSAE
from mechscope.sae.architectures.standard import StandardSAE
from mechscope.sae.architectures.topk import TopKSAE

__all__ = ["BatchTopKSAE", "GatedSAE", "JumpReLUSAE", "StandardSAE", "TopKSAE"]

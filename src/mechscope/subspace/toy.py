"""Ground truth for the interpretability illusion: tiny models built by hand.

Both models read a two-token prompt ``[filler, A or B]`` and predict the feature token (``A`` or
``B``) at the last position. The embedding writes the feature ``f = ±1`` to residual
coordinate 0 and a constant 1 to coordinate 1; attention is switched off (zero weights).

* `illusion_toy` (after Makelov, Lange and Nanda, 2023): the unembedding reads ``f`` straight
  from the residual stream, and the MLP plays no part in the behaviour. Its hidden layer
  ``hook_post`` has a *causally disconnected* pair of neurons, ``relu(f)`` and ``relu(-f)``,
  which vary with the feature but which ``W_out`` ignores, and a *dormant* neuron
  ``relu(-1) = 0``, constant on every prompt, which ``W_out`` writes (with ``dormant_weight``)
  to a coordinate the unembedding reads. Patching the direction ``(disconnected + dormant)/√2``
  flips the prediction although neither part alone can: `ILLUSORY_DIRECTION`.
* `genuine_toy`: the feature reaches the output only through the MLP (``relu(f) - relu(-f)``),
  with a disconnected neuron beside it; the direction the model uses, `GENUINE_DIRECTION`, lies
  in the row space of ``W_out``.

``toy_pairs`` builds interchange pairs for both (`InterchangeData`), read at `TOY_HOOK`.
"""

from __future__ import annotations

import math

import torch

from mechscope.model.config import ModelConfig
from mechscope.model.transformer import HookedTransformer
from mechscope.subspace.intervention import InterchangeData

A, B = 0, 1
FILLERS = (2, 3)
TOY_HOOK = "blocks.0.mlp.hook_post"
ILLUSORY_DIRECTION = torch.tensor([0.5, -0.5, 1 / math.sqrt(2), 0.0])
"""``((e0 - e1)/√2 + e2)/√2``: the disconnected pair plus the dormant neuron of `illusion_toy`."""
GENUINE_DIRECTION = torch.tensor([1.0, -1.0, 0.0, 0.0]) / math.sqrt(2)
"""``(e0 - e1)/√2``: the neurons `genuine_toy` reads out."""


def toy_config() -> ModelConfig:
    return ModelConfig(
        d_model=4, n_layers=1, n_heads=1, d_mlp=4, d_vocab=4, n_ctx=8, act_fn="relu",
        normalization_type=None, positional_embedding_type="none", mlp_bias=True, model_name="subspace-toy",
    )  # fmt: skip


def build(w_in: list, w_out: list, w_u: list) -> HookedTransformer:
    """A toy with the shared embedding, no attention, and the given MLP and unembedding weights."""
    model = HookedTransformer(toy_config())
    state = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    # A writes f = +1, B writes f = -1; every token writes the constant 1 to coordinate 1.
    state["embed.W_E"] = torch.tensor([[1.0, 1, 0, 0], [-1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]])
    state["blocks.0.mlp.w_in"] = torch.tensor(w_in, dtype=torch.float32)  # [d_mlp, d_model]
    state["blocks.0.mlp.w_out"] = torch.tensor(w_out, dtype=torch.float32)  # [d_model, d_mlp]
    state["unembed.w_u"] = torch.tensor(w_u, dtype=torch.float32)  # [d_vocab, d_model]
    model.load_state_dict(state)
    return model.eval()


def illusion_toy(dormant_weight: float = 8.0) -> HookedTransformer:
    """The model whose MLP holds only a disconnected pair and a dormant neuron (module docstring).

    Example:
        >>> model = illusion_toy()
        >>> model(torch.tensor([[2, 0], [3, 1]]))[:, -1].argmax(-1).tolist()
        [0, 1]
    """
    w_in = [[1, 0, 0, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 0]]  # relu(f), relu(-f), relu(-1), 0
    w_out = [[0] * 4, [0] * 4, [0, 0, dormant_weight, 0], [0] * 4]  # only the dormant neuron is read
    w_u = [[1, 0, 1, 0], [-1, 0, -1, 0], [0] * 4, [0] * 4]  # logit A = r0 + r2, logit B = -(r0 + r2)
    return build(w_in, w_out, w_u)


def genuine_toy() -> HookedTransformer:
    """The model whose MLP carries the feature to the output (module docstring).

    Example:
        >>> genuine_toy()(torch.tensor([[2, 0], [3, 1]]))[:, -1].argmax(-1).tolist()
        [0, 1]
    """
    w_in = [[1, 0, 0, 0], [-1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]  # relu(f), relu(-f), relu(f + 1), 0
    w_out = [[0] * 4, [0] * 4, [1, -1, 0, 0], [0] * 4]  # r2 = relu(f) - relu(-f) = f
    w_u = [[0, 0, 1, 0], [0, 0, -1, 0], [0] * 4, [0] * 4]  # logit A = r2, logit B = -r2
    return build(w_in, w_out, w_u)


def toy_pairs(n: int = 64, seed: int = 0) -> InterchangeData:
    """``n`` base/source pairs with opposite features: the counterfactual answer is the source's token.

    Example:
        >>> data = toy_pairs(4)
        >>> bool((data.base_tokens[:, 1] != data.source_tokens[:, 1]).all())
        True
        >>> torch.equal(data.labels, data.source_tokens[:, 1])
        True
    """
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randint(2, (n,), generator=gen)
    fillers = torch.tensor(FILLERS)
    base = torch.stack([fillers[torch.randint(2, (n,), generator=gen)], feature], dim=1)
    source = torch.stack([fillers[torch.randint(2, (n,), generator=gen)], 1 - feature], dim=1)
    return InterchangeData(base, source, labels=source[:, 1].clone(), base_labels=base[:, 1].clone())

"""Roles of the heads of an IOI circuit (Wang et al. 2022), from attention and direct effects.

For prompts such as "When Mary and John went to the store, John gave a drink to" (indirect
object ``IO`` = Mary, subject ``S`` = John, mentioned at ``S1`` and ``S2``, the answer read at
``END``), every head gets:

* ``to_io``, ``to_s2``: its attention from ``END`` to the indirect object and to the second
  subject mention; ``s2_to_s1``: from ``S2`` to ``S1``;
* ``copy``: the direct effect of its output at ``END`` on ``logit(IO) - logit(S)`` (through the
  final norm's scale of the run, held fixed);
* ``induction``/``duplicate``: the detectors of `mechscope.analysis.heads` on repeated random tokens.

`ioi_head_roles` names, among given heads (e.g. a circuit's): name movers (attend to IO, copy it
positively), negative name movers (attend to IO, write against it), S-inhibition heads (attend
to S2 and write into a name mover's query in the circuit), induction and duplicate-token heads.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.analysis import heads as detectors
from mechscope.circuits.circuit import Circuit
from mechscope.errors import InputError
from mechscope.names import act_name


def _positions(tokens: Tensor, ids: Tensor, which: str) -> Tensor:
    """Per prompt, the first (``"first"``) or last (``"last"``) position holding ``ids[prompt]``."""
    hits = tokens == ids.to(tokens.device)[:, None]
    if not bool(hits.any(-1).all()):
        raise InputError("an answer token does not occur in its prompt; are these IOI prompts?")
    index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    if which == "last":
        return torch.where(hits, index, -1).amax(-1)
    return torch.where(hits, index, tokens.shape[1]).amin(-1)


@torch.no_grad()
def ioi_head_scores(
    model, tokens: Tensor, io: Tensor, s: Tensor, repeat_len: int = 20
) -> dict[str, Float[Tensor, "layer head"]]:
    """The per-head measures of the module docstring, each ``[layer, head]``, means over prompts
    (the detectors run on 8 random sequences of ``repeat_len`` tokens, repeated).

    Example:
        >>> tokens, io, s = torch.tensor([[5, 6, 7, 6, 8]]), torch.tensor([5]), torch.tensor([6])
        >>> scores = ioi_head_scores(model, tokens, io, s, repeat_len=6)
        >>> sorted(scores), scores["to_io"].shape
        (['copy', 'duplicate', 'induction', 's2_to_s1', 'to_io', 'to_s2'], torch.Size([3, 4]))
    """
    n, cfg = tokens.shape[0], model.cfg
    rows = torch.arange(n, device=tokens.device)
    io_pos, s1_pos = _positions(tokens, io, "first"), _positions(tokens, s, "first")
    s2_pos = _positions(tokens, s, "last")
    names = [act_name("pattern", layer) for layer in range(cfg.n_layers)]
    names += [act_name("result", layer) for layer in range(cfg.n_layers)]
    names += [act_name("scale")] if model.ln_final is not None and cfg.normalization_type is not None else []
    _, cache = model.run_with_cache(tokens, names_filter=names)
    pattern = torch.stack([cache[act_name("pattern", layer)] for layer in range(cfg.n_layers)], dim=-1)
    pattern = pattern.permute(0, 2, 3, 4, 1)  # [n, query_pos, key_pos, layer, head]
    end = tokens.shape[1] - 1
    to_io = pattern[rows, end, io_pos].mean(0)  # [layer, head]
    to_s2 = pattern[rows, end, s2_pos].mean(0)
    s2_to_s1 = pattern[rows, s2_pos, s1_pos].mean(0)
    result = torch.stack([cache[act_name("result", layer)][:, end] for layer in range(cfg.n_layers)])  # [l, n, h, d]
    if cfg.normalization_type in ("LN", "LNPre"):  # the final norm centres what it reads
        result = result - result.mean(-1, keepdim=True)
    if act_name("scale") in cache:
        result = result / cache[act_name("scale")][:, end][None, :, None]
    w_u = model.unembed.W_U  # [d_model, d_vocab]
    weight = getattr(model.ln_final, "w", None)
    weight = torch.ones(cfg.d_model, device=w_u.device) if weight is None else weight
    direction = (w_u[:, io] - w_u[:, s]).T * weight  # [n, d_model]
    copy = torch.einsum("lnhd,nd->lnh", result, direction).mean(1)
    repeated = detectors.repeated_random_tokens(model, seq_len=repeat_len, batch=8)
    return {
        "to_io": to_io, "to_s2": to_s2, "s2_to_s1": s2_to_s1, "copy": copy,
        "induction": detectors.induction_scores(model, repeated),
        "duplicate": detectors.duplicate_token_scores(model, repeated),
    }  # fmt: skip


def ioi_head_roles(
    scores: dict[str, Tensor], circuit: Circuit | None = None, *, attention: float = 0.2, detector: float = 0.3
) -> dict[str, list[str]]:
    """Heads by role (see the module docstring), among ``circuit``'s heads (default: every head).

    ``attention``: the least attention (to IO, to S2) a mover or S-inhibition head pays;
    ``detector``: the least induction or duplicate-token score.

    Example:
        >>> scores = {k: torch.zeros(2, 2) for k in ("to_io", "to_s2", "s2_to_s1", "copy", "induction", "duplicate")}
        >>> scores["to_io"][1, 0], scores["copy"][1, 0] = 0.6, 2.0
        >>> ioi_head_roles(scores)["name movers"]
        ['a1.h0']
    """
    n_layers, n_heads = scores["to_io"].shape
    heads = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    if circuit is not None:
        nodes = set(circuit.nodes())
        heads = [(layer, h) for layer, h in heads if f"a{layer}.h{h}" in nodes]

    def pick(condition, key: str) -> list[str]:
        chosen = [(layer, h) for layer, h in heads if condition(layer, h)]
        chosen.sort(key=lambda lh: -abs(float(scores[key][lh])))
        return [f"a{layer}.h{h}" for layer, h in chosen]

    movers = pick(lambda layer, h: scores["to_io"][layer, h] >= attention and scores["copy"][layer, h] > 0, "copy")
    negative = pick(lambda layer, h: scores["to_io"][layer, h] >= attention and scores["copy"][layer, h] < 0, "copy")
    into_movers = set()
    if circuit is not None:
        for name in circuit.edge_names:
            sender, receiver = name.split("->")
            if receiver.endswith("<q>") and receiver[:-3] in movers + negative:
                into_movers.add(sender)
    inhibition = pick(lambda layer, h: scores["to_s2"][layer, h] >= attention
                      and (circuit is None or f"a{layer}.h{h}" in into_movers), "to_s2")  # fmt: skip
    return {
        "name movers": movers,
        "negative name movers": negative,
        "S-inhibition": inhibition,
        "induction": pick(lambda layer, h: scores["induction"][layer, h] >= detector, "induction"),
        "duplicate token": pick(lambda layer, h: scores["duplicate"][layer, h] >= detector, "duplicate"),
    }

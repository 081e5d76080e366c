"""The hook-name grammar: short names to full hook names and back, and activation layouts.

Every activation of a `HookedTransformer` has a dotted hook name, as in TransformerLens:
``hook_embed``, ``blocks.{layer}.hook_resid_pre``, ``blocks.{layer}.attn.hook_z``,
``blocks.{layer}.mlp.hook_post``, ``blocks.{layer}.ln1.hook_scale``, ``ln_final.hook_normalized``,
``unembed.hook_in``, ``unembed.hook_out``. `act_name` builds a full name from a short one,
`parse_act_name` takes one apart, and `Site` describes an activation's layout for the methods
that index into it (patching, attribution).

Axis vocabulary (the names used in shape annotations, `Site.axes` and einops patterns):

==============  ==============================================================
``batch``       one row per sequence (or per patched copy of a sequence)
``pos``         token position; ``query_pos`` / ``key_pos`` in attention patterns
``head``        attention (query) head; ``kv_head`` a key/value head (grouped-query)
``d_head``      per-head width; ``d_model`` residual width; ``d_mlp`` MLP width
``d_vocab``     vocabulary; ``layer`` block index; ``d_sae`` SAE latents
==============  ==============================================================
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mechscope.errors import HookNameError

AXES = (
    "batch",
    "pos",
    "query_pos",
    "key_pos",
    "head",
    "kv_head",
    "d_head",
    "d_model",
    "d_mlp",
    "d_vocab",
    "layer",
    "d_sae",
)

BLOCK_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "attn_in": "hook_attn_in",
    "mlp_in": "hook_mlp_in",
    "q_input": "hook_q_input",
    "k_input": "hook_k_input",
    "v_input": "hook_v_input",
}
ATTN_HOOKS = ("q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")
MLP_HOOKS = ("pre", "pre_linear", "post", "mid")
NORM_HOOKS = ("scale", "normalized")
GLOBAL_HOOKS = ("embed", "pos_embed", "tokens")


def closest_names(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """The valid names most similar to ``name`` (for error messages).

    Example:
        >>> closest_names("resid_prе", ["resid_pre", "resid_post", "z"])
        ['resid_pre', 'resid_post']
    """
    return difflib.get_close_matches(name, list(valid), n=n, cutoff=0.5)


def unknown_name_error(name: str, valid: Iterable[str], what: str = "hook point") -> HookNameError:
    """A `HookNameError` naming ``name`` and the closest of ``valid``.

    Example:
        >>> str(unknown_name_error("hook_zz", ["hook_z", "hook_q"]))
        "unknown hook point 'hook_zz'; closest valid names: ['hook_z', 'hook_q']"
    """
    valid = list(valid)
    close = closest_names(name, valid)
    hint = f"; closest valid names: {close}" if close else f"; {len(valid)} valid names, e.g. {valid[:5]}"
    return HookNameError(f"unknown {what} {name!r}{hint}")


NAME_ALIASES = {
    "attn": "pattern",
    "attn_logits": "attn_scores",
    "key": "k",
    "query": "q",
    "value": "v",
    "mlp_pre": "pre",
    "mlp_mid": "mid",
    "mlp_post": "post",
}
"""TransformerLens' other spellings of short names."""
MODULE_ALIASES = {"a": "attn", "attention": "attn", "m": "mlp", "b": "", "block": "", "blocks": ""}
"""TransformerLens' spellings of the ``sublayer`` (its ``layer_type``)."""
COMPACT_NAME = re.compile(r"([a-z]+)(\d+)([a-z]?.*)")
"""A compact short name: kind, layer, sublayer (``"k6"``, ``"scale4ln1"``, ``"pre5"``)."""


def act_name(name: str, layer: int | None = None, sublayer: str | None = None) -> str:
    """The full hook name for a short name: TransformerLens' ``get_act_name`` grammar.

    A full name (containing a dot or starting with ``hook_``) is returned unchanged. Short names
    take TransformerLens' aliases (`NAME_ALIASES`: ``"attn"`` is the pattern), its compact form
    (``"k6"``, ``"scale4ln1"``) and its sublayer spellings (`MODULE_ALIASES`). mechscope extends
    it: a norm hook with a layer and no sublayer is ``ln1``'s, and an unknown short name, or a
    block hook without a layer, raises `HookNameError` naming the valid ones (TransformerLens
    returns a name no model has).

    Example:
        >>> act_name("z", 3), act_name("resid_pre", 0), act_name("scale", 2, "ln1"), act_name("scale")
        ('blocks.3.attn.hook_z', 'blocks.0.hook_resid_pre', 'blocks.2.ln1.hook_scale', 'ln_final.hook_scale')
        >>> act_name("k6"), act_name("scale4ln1"), act_name("attn", 1), act_name("value", 0, "a")
        ('blocks.6.attn.hook_k', 'blocks.4.ln1.hook_scale', 'blocks.1.attn.hook_pattern', 'blocks.0.attn.hook_v')
    """
    if ("." in name or name.startswith("hook_")) and layer is None and sublayer is None:
        return name
    compact = COMPACT_NAME.match(name)
    if compact is not None:
        name, layer, sublayer = compact.group(1), int(compact.group(2)), compact.group(3) or None
    name = NAME_ALIASES.get(name, name)
    sublayer = MODULE_ALIASES.get(sublayer, sublayer) if sublayer else None
    if name in GLOBAL_HOOKS:
        return f"hook_{name}"
    if name in NORM_HOOKS:
        return f"ln_final.hook_{name}" if layer is None else f"blocks.{layer}.{sublayer or 'ln1'}.hook_{name}"
    if layer is None:
        raise HookNameError(f"short name {name!r} needs a layer, e.g. act_name({name!r}, 0)")
    if name in BLOCK_HOOKS:
        return f"blocks.{layer}.{BLOCK_HOOKS[name]}"
    if name in ATTN_HOOKS:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in MLP_HOOKS:
        return f"blocks.{layer}.mlp.hook_{name}"
    valid = [*BLOCK_HOOKS, *ATTN_HOOKS, *MLP_HOOKS, *GLOBAL_HOOKS, *NORM_HOOKS, *NAME_ALIASES]
    raise unknown_name_error(name, valid, "short name")


@dataclass(frozen=True)
class ParsedName:
    """A full hook name taken apart: its short ``kind``, ``layer`` (``None`` outside the blocks)
    and the ``module`` path between them (``"attn"``, ``"mlp"``, ``"ln1"``, ``"ln_final"``, ``""``).

    ``act_name(p.kind, p.layer, p.module)`` rebuilds the name for every hook of a model.
    """

    kind: str
    layer: int | None
    module: str


def parse_act_name(name: str) -> ParsedName:
    """The inverse of `act_name`: ``(kind, layer, module)`` of a full hook name.

    Example:
        >>> parse_act_name("blocks.3.attn.hook_z")
        ParsedName(kind='z', layer=3, module='attn')
        >>> parse_act_name("blocks.0.hook_resid_pre"), parse_act_name("ln_final.hook_scale")
        (ParsedName(kind='resid_pre', layer=0, module=''), ParsedName(kind='scale', layer=None, module='ln_final'))
        >>> parse_act_name("unembed.hook_out")
        ParsedName(kind='out', layer=None, module='unembed')
        >>> parse_act_name("blocks.x.hook_z")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.HookNameError: 'blocks.x.hook_z' is not a hook name: expected 'hook_<kind>', ...
    """
    parts = name.split(".")
    problem = HookNameError(
        f"{name!r} is not a hook name: expected 'hook_<kind>', 'blocks.<layer>.hook_<kind>' "
        "or 'blocks.<layer>.<module>.hook_<kind>'"
    )
    if not parts[-1].startswith("hook_") or len(parts[-1]) == len("hook_"):
        raise problem
    kind = parts[-1][len("hook_") :]
    if parts[0] == "blocks":
        if len(parts) not in (3, 4) or not parts[1].isdigit():
            raise problem
        return ParsedName(kind, int(parts[1]), parts[2] if len(parts) == 4 else "")
    if len(parts) > 2:
        raise problem
    return ParsedName(kind, None, parts[0] if len(parts) == 2 else "")


def layer_of(name: str) -> int | None:
    """The block index of a hook name, or ``None`` for a hook outside the blocks.

    Example:
        >>> layer_of("blocks.11.mlp.hook_post"), layer_of("hook_embed")
        (11, None)
    """
    return parse_act_name(name).layer


def name_pattern(name: str) -> str:
    """A hook name with its layer replaced by ``{l}`` (to group the same hook across layers).

    Example:
        >>> name_pattern("blocks.7.attn.hook_z"), name_pattern("hook_embed")
        ('blocks.{l}.attn.hook_z', 'hook_embed')
    """
    parsed = parse_act_name(name)
    if parsed.layer is None:
        return name
    return name.replace(f"blocks.{parsed.layer}.", "blocks.{l}.", 1)


@dataclass(frozen=True)
class Site:
    """An activation layout: its short hook name, its axes after ``batch``, and the default ``by``
    (the axes a patch or an attribution indexes when the caller does not say).

    Example:
        >>> SITES["z"].hook(2), SITES["z"].axes
        ('blocks.2.attn.hook_z', ('pos', 'head', 'd_head'))
    """

    name: str
    axes: tuple[str, ...]
    default_by: tuple[str, ...]

    def hook(self, layer: int) -> str:
        """The full hook name of this site at ``layer`` (see `act_name`)."""
        return act_name(self.name, layer)


_RESID = ("pos", "d_model")
SITES: dict[str, Site] = {
    "resid_pre": Site("resid_pre", _RESID, ("pos",)),
    "resid_mid": Site("resid_mid", _RESID, ("pos",)),
    "resid_post": Site("resid_post", _RESID, ("pos",)),
    "attn_out": Site("attn_out", _RESID, ("pos",)),
    "mlp_out": Site("mlp_out", _RESID, ("pos",)),
    "z": Site("z", ("pos", "head", "d_head"), ("head",)),
    "result": Site("result", ("pos", "head", "d_model"), ("head",)),
    "q": Site("q", ("pos", "head", "d_head"), ("head",)),
    # Grouped-query models: keys and values are indexed per key-value head.
    "k": Site("k", ("pos", "kv_head", "d_head"), ("kv_head",)),
    "v": Site("v", ("pos", "kv_head", "d_head"), ("kv_head",)),
    "pattern": Site("pattern", ("head", "query_pos", "key_pos"), ("head",)),
    "post": Site("post", ("pos", "d_mlp"), ("d_mlp",)),
}
"""Every patching site by short name: its activation layout and default ``by`` (see `Site`)."""

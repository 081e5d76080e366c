"""Naive references for the circuit tests: one full forward per edge set, one hook per receiver
input, one edge at a time. Written from the definitions, independently of `mechscope.circuits`."""

from __future__ import annotations

import torch


def parse_sender(name: str):
    """('input'|'pos', None, None) | ('head', layer, head) | ('mlp', layer, None)."""
    if name in ("input", "pos"):
        return name, None, None
    if name.startswith("m"):
        return "mlp", int(name[1:]), None
    layer, head = name[1:].split(".h")
    return "head", int(layer), int(head)


def parse_receiver(name: str):
    """('q'|'k'|'v', layer, head) | ('mlp', layer, None) | ('logits', None, None)."""
    if name == "logits":
        return "logits", None, None
    if name.startswith("m"):
        return "mlp", int(name[1:]), None
    body, which = name[:-1].split("<")
    layer, head = body[1:].split(".")
    return which, int(layer), int(head.lstrip("hkv"))


def sender_names(model) -> list[str]:
    cfg = model.cfg
    names = ["input"] + (["pos"] if cfg.positional_embedding_type == "standard" else [])
    for layer in range(cfg.n_layers):
        names += [f"a{layer}.h{h}" for h in range(cfg.n_heads)] + ([] if cfg.attn_only else [f"m{layer}"])
    return names


def sender_hook_names(model) -> list[str]:
    cfg = model.cfg
    names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positional_embedding_type == "standard" else [])
    for layer in range(cfg.n_layers):
        names.append(f"blocks.{layer}.attn.hook_result")
        if not cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
    return names


def outputs_from(store: dict, name: str, b_o=None) -> torch.Tensor:
    kind, layer, head = parse_sender(name)
    if kind == "input":
        return store["hook_embed"]
    if kind == "pos":
        return store["hook_pos_embed"]
    if kind == "mlp":
        return store[f"blocks.{layer}.hook_mlp_out"]
    return store[f"blocks.{layer}.attn.hook_result"][:, :, head]


def source_outputs(model, tokens, attention_mask=None, ablation="patch") -> dict[str, torch.Tensor]:
    """Each sender's output in a plain run of ``tokens``: as is, its mean over prompts, or zeros."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=sender_hook_names(model), attention_mask=attention_mask)
    out = {}
    for name in sender_names(model):
        value = outputs_from(cache, name)
        if ablation == "mean":
            if attention_mask is None:
                value = value.mean(0, keepdim=True)
            else:
                w = attention_mask.to(value.dtype)[:, :, None]
                value = (value * w).sum(0, keepdim=True) / w.sum(0, keepdim=True).clamp_min(1)
        elif ablation == "zero":
            value = torch.zeros_like(value[:1])
        out[name] = value
    return out


@torch.no_grad()
def naive_patched_logits(model, tokens, source: dict, edges: list[tuple[str, str]], attention_mask=None):
    """A full forward of ``tokens`` where every edge ``(sender, receiver)`` of ``edges`` carries
    ``source[sender]`` instead of what the sender writes in this forward."""
    cfg = model.cfg
    current: dict[str, torch.Tensor] = {}

    def save(x, *, hook):
        current[hook.name] = x

    def delta(sender: str) -> torch.Tensor:
        return outputs_from(current, sender) - source[sender]

    def head_sum(layer: int, swap: dict) -> torch.Tensor:
        result = current[f"blocks.{layer}.attn.hook_result"]
        total = torch.zeros_like(result[:, :, 0])
        for h in range(cfg.n_heads):
            total = total + swap.get(h, result[:, :, h])
        b_o = model.blocks[layer].attn.b_o
        return total if b_o is None else total + b_o

    def correction(receiver_edges: list[str]) -> torch.Tensor:
        """What one receiver stops reading: the patched edges' differences, one at a time."""
        corr = 0.0
        post_swaps: dict[int, dict[int, torch.Tensor]] = {}
        for sender in receiver_edges:
            kind, layer, head = parse_sender(sender)
            if kind == "head" and cfg.post_norm:
                post_swaps.setdefault(layer, {})[head] = source[sender].expand_as(outputs_from(current, sender))
            else:
                corr = corr + delta(sender)
        for layer, swap in post_swaps.items():
            norm = model.blocks[layer].ln1_post
            corr = corr + norm(head_sum(layer, {})) - norm(head_sum(layer, swap))
        return corr

    by_receiver: dict[str, list[str]] = {}
    for sender, receiver in edges:
        by_receiver.setdefault(receiver, []).append(sender)

    hooks = [(name, save) for name in sender_hook_names(model)]
    for receiver, senders in by_receiver.items():
        which, layer, head = parse_receiver(receiver)
        if which in ("q", "k", "v"):

            def edit(x, *, hook, senders=senders, head=head):
                x = x.clone()
                x[:, :, head] = x[:, :, head] - correction(senders)
                return x

            hooks.append((f"blocks.{layer}.hook_{which}_input", edit))
        elif which == "mlp":
            hooks.append((f"blocks.{layer}.hook_mlp_in", lambda x, *, hook, s=senders: x - correction(s)))
        else:
            name = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
            hooks.append((name, lambda x, *, hook, s=senders: x - correction(s)))
    return model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=hooks)


def deltas(model, base: dict, source: dict) -> dict[str, torch.Tensor]:
    """What patching each sender's edges adds to a receiver: ``source - base``; on post-norm models
    a head's change of its layer's post-normed output."""
    cfg = model.cfg
    out = {name: source[name] - base[name] for name in base}
    if cfg.post_norm:
        for layer in range(cfg.n_layers):
            heads = [f"a{layer}.h{h}" for h in range(cfg.n_heads)]
            total = sum(base[h] for h in heads)
            b_o = model.blocks[layer].attn.b_o
            total = total if b_o is None else total + b_o
            norm = model.blocks[layer].ln1_post
            for h in heads:
                out[h] = norm(total - base[h] + source[h]) - norm(total)
    return out


def receiver_hook(model, receiver: str, add):
    """A hook adding ``add()`` to one receiver's input (through the per-head input hooks)."""
    which, layer, head = parse_receiver(receiver)
    if which in ("q", "k", "v"):

        def edit(x, *, hook):
            x = x.clone()
            x[:, :, head] = x[:, :, head] + add()
            return x

        return f"blocks.{layer}.hook_{which}_input", edit
    if which == "mlp":
        return f"blocks.{layer}.hook_mlp_in", lambda x, *, hook: x + add()
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", lambda x, *, hook: x + add()


def edge_derivative(model, tokens, delta: torch.Tensor, receiver: str, metric, extra_hooks=(), copies: int = 1):
    """``d/d eps`` of the mean metric when ``eps * delta`` is added to the receiver's input."""
    eps = torch.zeros((), requires_grad=True)
    hooks = [receiver_hook(model, receiver, lambda: eps * delta.repeat(copies, 1, 1))] + list(extra_hooks)
    logits = model.run_with_hooks(tokens.repeat(copies, 1), fwd_hooks=hooks)
    return torch.autograd.grad(metric(logits).sum() / tokens.shape[0], eps)[0]

# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Induction heads
#
# An induction head completes a repeated pattern `[A][B] … [A] → [B]`: at the second `[A]` it
# attends to the token *after* the earlier `[A]` and copies it. It needs a partner, a
# previous-token head in an earlier layer that writes "the previous token was `[A]`" into each
# position, which the induction head's keys read (K-composition). Olsson et al., *In-context
# learning and induction heads* (2022).
#
# Below: the heads of the bundled SmolLM2-135M on repeated random tokens, their attention, and
# the circuit in weight space; then a two-layer attention-only toy trained from scratch, where
# the circuit is checked causally. Settings are reduced; the full versions:
#
# ```bash
# .venv/bin/python docs/reading_mechanisms.py        # every detector on SmolLM2 (40 tokens, 4 sequences)
# mechscope toys induction --out runs/induction      # the toy at full size (6,000 steps, ~4 minutes)
# ```

# %%
import html

import matplotlib.pyplot as plt
import torch
from IPython.display import HTML, display

import mechscope as ms
from mechscope import toys
from mechscope.analysis import (
    composition_scores,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
    top_heads,
)
from mechscope.viz import attention_heads_html

torch.set_grad_enabled(False)

# %% [markdown]
# ## Repeated random tokens
#
# Twenty random tokens, repeated: on the second half every next token is predictable from the
# first half, and nothing else helps. The loss shows it.

# %%
model = ms.load("smollm2-135m", device="cpu")
tokens = repeated_random_tokens(model, seq_len=20, batch=2, seed=0)  # [batch, 2 * seq_len]
loss = model(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
print(tokens.shape)
print(f"loss on the first half {loss[:, :19].mean():.2f}, on the second half {loss[:, 20:].mean():.2f}")

# %% [markdown]
# ## Induction and previous-token scores
#
# Each detector returns a `[layer, head]` tensor: the attention mass a head puts on its target
# keys (the previous position; the position after an earlier copy of the current token),
# averaged over the queries that have one, so 1.0 is a perfect head.

# %%
induction = induction_scores(model, tokens)
previous = previous_token_scores(model, tokens)
print("induction     ", top_heads(induction, k=4))
print("previous token", top_heads(previous, k=4))

fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
for ax, scores, title in [(axes[0], previous, "previous-token score"), (axes[1], induction, "induction score")]:
    image = ax.imshow(scores, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_title(title)
    ax.set_xlabel("head")
axes[0].set_ylabel("layer")
fig.colorbar(image, ax=axes)
plt.show()

# %% [markdown]
# ## What the heads attend to
#
# On the repeated half, the induction head attends `seq_len - 1` positions back (the token
# after the earlier copy): a stripe parallel to the diagonal. The previous-token head's pattern
# is the sub-diagonal.

# %%


def layer_head(label):
    """("L18H6") -> (18, 6)"""
    layer, head = label[1:].split("H")
    return int(layer), int(head)


ind_layer, ind_head = layer_head(top_heads(induction, k=1)[0][0])
prev_layer, prev_head = layer_head(top_heads(previous, k=1)[0][0])
_, cache = model.run_with_cache(tokens[:1], names_filter=lambda name: name.endswith("hook_pattern"))
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
for ax, (layer, head) in zip(axes, [(prev_layer, prev_head), (ind_layer, ind_head)], strict=True):
    ax.imshow(cache["pattern", layer][0, head], cmap="Blues")
    ax.set_title(f"L{layer}H{head}")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
fig.tight_layout()
plt.show()

# %% [markdown]
# `mechscope.viz.attention_heads_html` makes an interactive, self-contained view of a layer
# (pick a head; hover a cell or a token); `save_html` writes it to a file. Here it is inline:

# %%
str_tokens = model.to_str_tokens(tokens[0])
view = attention_heads_html(
    cache["pattern", ind_layer][0],
    str_tokens,
    [f"L{ind_layer}H{h}" for h in range(model.cfg.n_heads)],
    title=f"Layer {ind_layer} on repeated random tokens",
)
frame = f'<iframe srcdoc="{html.escape(view)}" style="width:100%; height:820px; border:0"></iframe>'
display(HTML(f"<div>{frame}</div>"))  # the view's page is isolated in its own frame

# %% [markdown]
# ## The circuit in weight space: K-composition
#
# `composition_scores(model, "K")[l1, h1, l2, h2]` measures how much head `(l1, h1)`'s output
# is read by head `(l2, h2)`'s keys, from the weights alone
# (`‖OV₁ QK₂ᵀ‖ / (‖OV₁‖ ‖QK₂‖)`; grouped-query heads are expanded). The heads that write most
# into the induction head's keys:

# %%
k_comp = composition_scores(model, "K")  # [layer, head, layer, head]
print(f"into L{ind_layer}H{ind_head}:", top_heads(k_comp[:, :, ind_layer, ind_head], k=3))
writers = [label for label, _ in top_heads(k_comp[:, :, ind_layer, ind_head], k=3)]
print("their previous-token scores:", [(label, round(float(previous[layer_head(label)]), 2)) for label in writers])

# %% [markdown]
# The strongest writer into the induction head's keys is a previous-token head: the two-head
# circuit, found from the weights. (The scores ignore RoPE and the norms: they measure the
# position-free content part of the circuit.)
#
# ## The two-layer toy
#
# A two-layer attention-only transformer trained on sequences with repeated spans forms the
# same circuit from scratch. `InductionConfig` below is the reduced one of the tests (vocabulary
# 32, length 24, 800 steps; about 10 s of one core).

# %%
torch.set_grad_enabled(True)
torch.set_num_threads(1)
config = toys.InductionConfig(d_vocab=32, seq_len=24, d_model=32, lr=1e-2, steps=800)
run = toys.train_induction(config, progress=False)
torch.set_grad_enabled(False)
summary = toys.induction_summary(run)
print(f"loss on the repeated half {summary['second_half_loss']:.2f} (chance {summary['chance_loss']:.2f})")
print(
    "previous-token head (layer 0):",
    summary["previous_token_head"],
    "; induction head (layer 1):",
    summary["induction_head"],
)

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for ax, key, title in [
    (axes[0], "previous_token_scores", "previous-token score"),
    (axes[1], "induction_scores", "induction score"),
]:
    image = ax.imshow(torch.tensor(summary[key]), cmap="Blues", vmin=0, vmax=1)
    ax.set_title(title)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax)
image = axes[2].imshow(torch.tensor(summary["k_composition_ablation"]), cmap="Reds")
axes[2].set_title("drop of the induction score\nwhen a layer-0 head leaves the keys")
axes[2].set_xlabel("layer-1 head")
axes[2].set_ylabel("layer-0 head")
fig.colorbar(image, ax=axes[2])
fig.tight_layout()
plt.show()

# %% [markdown]
# The causal check (`k_composition_ablation`): mean-ablate one layer-0 head's output in the
# layer-1 keys only, and measure how far each layer-1 head's induction score falls. The
# weight-space and causal answers agree on which layer-0 head the induction heads read:

# %%
print("highest K-composition pair (layer-0 head, layer-1 head), by weights:", summary["k_composition_best_pair"])
print("by ablation:", summary["k_composition_ablation_best_pair"])
print(
    "every induction head reads a previous-token head most, by weights:",
    summary["each_induction_head_composes_most_with_a_previous_token_head"],
    "; by ablation:",
    summary["each_induction_head_depends_most_on_a_previous_token_head"],
)

# %% [markdown]
# The layer-1 heads here are redundant induction heads (all four score alike), so "the"
# induction head is the best of several close ones; [Toy models](../toys.md) records how often
# the strict checks hold over seeds at full size.

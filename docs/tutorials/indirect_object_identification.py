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
# # Indirect object identification
#
# "When Mary and John went to the store, John gave a drink to" → " Mary". Wang et al.,
# *Interpretability in the wild* (2022), traced how GPT-2 small does this: heads that notice
# the duplicated name (" John"), heads that move that information to the end, and *name mover*
# heads that copy the other name to the output. This page localises the behaviour in the bundled
# SmolLM2-135M with the tools of that search:
#
# 1. the **logit difference** between the indirect object and the subject (the metric);
# 2. **direct logit attribution** (DLA) by head: who writes the answer;
# 3. **activation patching** by layer and position, and by head: what matters causally;
# 4. **path patching**: which heads act *directly* on the logits;
# 5. **AtP and AtP\***: gradient estimates of every head's patching effect, verified exactly,
#    with a bound on the heads they may have missed.
#
# Four prompts, the residual stream at every fifth layer and the heads of the upper half keep
# this page fast. The full-size report (8 prompts, every layer, every head), written as HTML
# with PNG heatmaps:
#
# ```bash
# mechscope tour --ioi-full        # or --ioi for the quick version shown here
# ```

# %%
import matplotlib.pyplot as plt
import torch

import mechscope as ms
from mechscope.analysis import direct_logit_attribution
from mechscope.data import ioi_dataset
from mechscope.patching import LogitDiff, Normalized, activation_patch, atp_star, attribution_patch, path_patch

torch.set_grad_enabled(False)
model = ms.load("smollm2-135m", device="cpu")

# %% [markdown]
# ## Prompts and the metric
#
# `ioi_dataset` builds clean prompts (half ABBA, half BABA name order) and corrupted ones in
# which the second mention of the subject is replaced by an unrelated name, so the corrupted
# prompt no longer says who the indirect object is. Names, places and objects are kept only
# where they are single tokens for this tokenizer, so all prompts have one length.

# %%
data = ioi_dataset(model, n=4)
clean, corrupted = data.clean_tokens, data.corrupted_tokens
for c, x in zip(data.clean_prompts[:2], data.corrupted_prompts[:2], strict=True):
    print(f"clean:     {c!r}\ncorrupted: {x!r}")

logit_diff = LogitDiff(data.correct, data.wrong)  # indirect object minus subject, final position
clean_logits, corrupted_logits = model(clean), model(corrupted)
clean_value, corrupted_value = logit_diff(clean_logits).mean(), logit_diff(corrupted_logits).mean()
print(f"logit difference: clean {clean_value:.2f}, corrupted {corrupted_value:.2f}")

# %% [markdown]
# Patching results read best on a normalised scale: `Normalized` maps the corrupted run's
# logit difference to 0 and the clean run's to 1.

# %%
metric = Normalized(logit_diff, clean_logits, corrupted_logits)

# %% [markdown]
# ## Direct logit attribution by head
#
# The final residual stream is a sum of the embedding, every head's output and every MLP's
# output. Through the final norm (its scale read from the cache) and the unembedding, each
# term's share of the logit difference is exact: the shares add up to it.

# %%
logits, cache = model.run_with_cache(clean)
dla = direct_logit_attribution(cache, data.correct, against=data.wrong, by="head")
print("sum of the shares:", [round(v, 3) for v in dla.total().tolist()])
print("logit difference: ", [round(v, 3) for v in logit_diff(logits).tolist()])
print(dla.table(k=8))

# %% [markdown]
# ## Activation patching: the residual stream by layer and position
#
# *Denoising* (the default): run the corrupted prompts and patch in one clean activation at a
# time; a patch that restores the metric to 1 carries everything the clean run needed.
# (*Noising* is the reverse: run clean, patch in corrupted activations, see what breaks.)
# Patches run as batch elements of a few forwards that start at the patched layer.

# %%
final = {"logit_positions": -1}  # the metric reads the final position: unembed only that one
layers = [*range(0, model.cfg.n_layers, 5), model.cfg.n_layers - 1]
resid = activation_patch(model, clean, corrupted, metric, "resid_pre", layers=layers, **final)  # [layer, pos]
str_tokens = model.to_str_tokens(clean[0])
fig, ax = plt.subplots(figsize=(9, 4))
image = ax.imshow(resid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
ax.set_xticks(range(len(str_tokens)), str_tokens, rotation=60, ha="right")
ax.set_yticks(range(len(layers)), layers)
ax.set_ylabel("layer (resid_pre)")
ax.set_title("denoising the residual stream (normalised logit difference)")
fig.colorbar(image)
fig.tight_layout()
plt.show()

# %%
for layer, row in zip(layers, resid, strict=True):
    print(f"layer {layer:>2}: largest effect {row.max():.2f}, at {str_tokens[int(row.argmax())]!r}")

# %% [markdown]
# Early on, the effect sits at the second mention of the subject, the one token that differs
# between clean and corrupted prompts; in the last layers it has moved to the final position,
# where the answer is read out.
#
# ## Activation patching by head
#
# Patching each head's output (`hook_z`, every position at once) in the upper half of the
# model, where the DLA above found the heads that write the answer:

# %%
head_layers = list(range(model.cfg.n_layers // 2, model.cfg.n_layers))
heads = activation_patch(model, clean, corrupted, metric, "z", layers=head_layers, **final)  # [layer, head]
fig, ax = plt.subplots(figsize=(5, 5))
image = ax.imshow(heads, cmap="RdBu", vmin=-0.5, vmax=0.5, aspect="auto")
ax.set_yticks(range(len(head_layers)), head_layers)
ax.set_xlabel("head")
ax.set_ylabel("layer")
ax.set_title("denoising each head's output")
fig.colorbar(image)
fig.tight_layout()
plt.show()
top = heads.flatten().abs().argsort(descending=True)[:6]
top_heads = [(head_layers[int(i) // model.cfg.n_heads], int(i) % model.cfg.n_heads) for i in top]
effect = {(layer, head): float(heads[layer - head_layers[0], head]) for layer, head in top_heads}
print("largest effects:", [(f"L{layer}H{head}", round(value, 3)) for (layer, head), value in effect.items()])

# %% [markdown]
# ## Path patching: direct effects on the logits
#
# Activation patching a head also changes every later head that reads it. Path patching
# isolates one path: each sender head's corrupted output reaches the logits (through the
# residual stream only) while every other component keeps its clean input. The metric is on
# the clean run here (the noising direction): values below 1 mark heads whose direct
# contribution the answer needs.

# %%
direct = path_patch(
    model, clean, corrupted, metric, senders=[[head] for head in top_heads], receivers="logits", **final
)
for (layer, head), value in zip(top_heads, direct.tolist(), strict=True):
    print(f"L{layer}H{head}: metric {value:.3f} with its path to the logits corrupted")

# %% [markdown]
# Heads whose corrupted path to the logits lowers the metric write the answer directly (the
# name movers of this model); heads with a large effect in the sweep above but a metric near 1
# here act through later heads instead.
#
# ## Attribution patching: AtP and AtP\*
#
# A patching sweep costs a forward per patch (batched); attribution patching (AtP) estimates
# every effect at once from one backward pass, `(a_clean - a_corrupted) · ∂metric/∂a`. It fails
# where attention saturates and where paths cancel; AtP\* (Kramár et al., 2024) fixes the first
# by recomputing the attention softmax exactly and the second with GradDrop, then verifies the
# best candidates exactly.

# %%
torch.set_grad_enabled(True)
atp = attribution_patch(model, clean, corrupted, metric, sites=["z"])["z"]  # [layer, head], every layer
exact = heads - metric(corrupted_logits).mean()  # the sweep above, as changes of the metric
estimate = atp[head_layers]
print(f"AtP vs the exact head effects (layers {head_layers[0]}-{head_layers[-1]}): correlation", end=" ")
print(f"{torch.corrcoef(torch.stack([estimate.flatten(), exact.flatten()]))[0, 1]:.3f}")

star = atp_star(model, clean, corrupted, metric, site="z", top_k=6, n_samples=20, seed=0, **final)
print(f"{'head':<8}{'AtP*':>8}{'exact':>8}")
candidates = star.candidates.tolist()
for layer, head in star.top.tolist():
    verified = float(star.verified[candidates.index([layer, head])])
    print(f"L{layer}H{head:<6}{float(star.estimates[layer, head]):8.3f}{verified:8.3f}")

# %% [markdown]
# The false-negative bound: a stratified random sample of the heads that were *not* verified is
# patched exactly too, bounding how many unverified heads have an effect above the threshold
# (by default the smallest verified effect in the top-k). Twenty samples find none here, but
# bound the count only loosely; `n_samples` in the hundreds tightens the bound at the cost of
# one exact patch each.

# %%
bound = star.false_negatives
print(
    f"threshold {bound.threshold:.3f}: sampled {bound.sampled} unverified heads, {bound.found} above it; "
    f"expected missed {bound.estimate:.1f}, at most {bound.upper_bound:.1f} ({bound.confidence:.0%} confidence)"
)
torch.set_grad_enabled(False)

# %% [markdown]
# [Reading mechanisms](../reading_mechanisms.md) continues the DLA side on one prompt (the
# heads' attention to the names, their OV circuits and the copy-suppression head).

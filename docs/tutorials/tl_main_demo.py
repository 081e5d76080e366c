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
# # TransformerLens code on mechscope
#
# The path of TransformerLens' *Main Demo* and *Exploratory Analysis Demo* (loading, caching,
# hooks, ablation, induction heads, activation patching, `FactoredMatrix`, generation, then
# the indirect-object task: logit difference, logit lens, direct logit attribution by layer
# and head, attention patterns and head patching), written as TransformerLens code with one
# changed import, on the bundled SmolLM2-135M. Every name keeps TransformerLens' meaning and
# defaults ([compatibility table](../tl_compat.md)). It runs on a CPU in a few minutes; the
# same analyses at full size, in mechscope's own API, are the tour:
#
# ```bash
# mechscope tour --ioi         # IOI patching and attribution on the bundled model, with an HTML report
# ```

# %%
import matplotlib.pyplot as plt
import torch

import mechscope.tl as transformer_lens
from mechscope.tl import FactoredMatrix, HookedTransformer, patching

torch.set_grad_enabled(False)  # nothing here needs gradients

# %% [markdown]
# ## Loading and running a model
#
# `from_pretrained` processes the weights as TransformerLens does (LayerNorm folding, centred
# unembedding, value biases folded; steps an architecture cannot take are skipped, here the
# centring of writing weights, since SmolLM2 uses RMSNorm). SmolLM2 was trained without a BOS
# token, so it is loaded with `default_prepend_bos=False` (TransformerLens' default is `True`).

# %%
model = HookedTransformer.from_pretrained("smollm2-135m", device="cpu", default_prepend_bos=False)
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads,", model.cfg.n_key_value_heads, "key/value heads")

model_description_text = """## Loading Models

HookedTransformer comes loaded with >40 open source GPT-style models. You can load any of them in with
`HookedTransformer.from_pretrained(MODEL_NAME)`. Each model is loaded into the consistent HookedTransformer
architecture, designed to be clean, consistent and interpretability-friendly."""
loss = model(model_description_text, return_type="loss")
print("Model loss:", round(float(loss), 3))

# %% [markdown]
# ## Caching all activations
#
# `run_with_cache` returns the logits and an `ActivationCache`; `remove_batch_dim=True` drops
# the batch axis of a single prompt. Keys take TransformerLens' short forms: `cache["pattern", 0]`,
# `cache["attn", 0]` (its alias) or the full hook name.

# %%
text = "Natural language processing tasks, such as question answering, machine translation, reading comprehension"
tokens = model.to_tokens(text)
logits, cache = model.run_with_cache(tokens, remove_batch_dim=True)
attention_pattern = cache["pattern", 0]  # [head, query_pos, key_pos]
print(attention_pattern.shape, cache["attn", 0] is cache["blocks.0.attn.hook_pattern"])
str_tokens = model.to_str_tokens(text)


def show_pattern(pattern, labels, title):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(pattern, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=90)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    fig.tight_layout()
    plt.show()


show_pattern(attention_pattern[3], str_tokens, "layer 0, head 3")

# %% [markdown]
# ## Hooks: ablating a head
#
# A hook is `fn(activation, hook)`; returning a tensor replaces the activation. SmolLM2 uses
# grouped-query attention (3 key/value heads for 9 query heads), so the demo's ablation of one
# head's values becomes an ablation of its output `z`, which has one slice per query head.

# %%
layer_to_ablate, head_index_to_ablate = 0, 8


def head_ablation_hook(z, hook):
    print(f"Shape of the value tensor: {z.shape}")
    z[:, :, head_index_to_ablate, :] = 0.0
    return z


original_loss = model(tokens, return_type="loss")
ablated_loss = model.run_with_hooks(
    tokens,
    return_type="loss",
    fwd_hooks=[(transformer_lens.utils.get_act_name("z", layer_to_ablate), head_ablation_hook)],
)
print(f"Original loss: {original_loss.item():.3f}")
print(f"Ablated loss: {ablated_loss.item():.3f}")

# %% [markdown]
# ## Activation patching
#
# Run the corrupted prompt, patch in one activation of the clean run, and measure how much of
# the clean logit difference comes back. `patching.get_act_patch_resid_pre` does it for every
# layer and position (`[layer, pos]`), batched underneath.

# %%
clean_prompt = "After John and Mary went to the store, Mary gave a bottle of milk to"
corrupted_prompt = "After John and Mary went to the store, John gave a bottle of milk to"
clean_tokens, corrupted_tokens = model.to_tokens(clean_prompt), model.to_tokens(corrupted_prompt)


def logits_to_logit_diff(logits, correct_answer=" John", incorrect_answer=" Mary"):
    correct_index, incorrect_index = model.to_single_token(correct_answer), model.to_single_token(incorrect_answer)
    return logits[0, -1, correct_index] - logits[0, -1, incorrect_index]


clean_logits, clean_cache = model.run_with_cache(clean_tokens)
clean_logit_diff = logits_to_logit_diff(clean_logits)
corrupted_logit_diff = logits_to_logit_diff(model(corrupted_tokens))
print(f"Clean logit difference: {clean_logit_diff.item():.3f}")
print(f"Corrupted logit difference: {corrupted_logit_diff.item():.3f}")


def ioi_metric(logits):
    """0 for the corrupted run, 1 for the clean run."""
    return (logits_to_logit_diff(logits) - corrupted_logit_diff) / (clean_logit_diff - corrupted_logit_diff)


resid_pre_patching = patching.get_act_patch_resid_pre(model, corrupted_tokens, clean_cache, ioi_metric)
print(resid_pre_patching.shape)  # [layer, pos]
fig, ax = plt.subplots(figsize=(7, 5))
image = ax.imshow(resid_pre_patching, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
clean_str_tokens = model.to_str_tokens(clean_prompt)
ax.set_xticks(range(len(clean_str_tokens)), clean_str_tokens, rotation=90)
ax.set_ylabel("layer")
ax.set_title("resid_pre activation patching")
fig.colorbar(image)
fig.tight_layout()
plt.show()

# %% [markdown]
# The name's information sits at the second name's position in early layers and moves to the
# last position in the later ones.
#
# ## Induction heads
#
# On a random sequence repeated twice, an induction head attends from each token of the second
# copy to the token after its first occurrence: the diagonal `seq_len - 1` below the main one.
# A hook on every pattern (a filter function as the name) collects each head's score.

# %%
seq_len, batch = 30, 4
vocab_sample = torch.randint(100, 20000, (batch, seq_len), generator=torch.Generator().manual_seed(0))
repeated_tokens = torch.cat([vocab_sample, vocab_sample], dim=1)
induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads))


def induction_score_hook(pattern, hook):
    induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)  # [batch, head, stripe]
    induction_score_store[hook.layer(), :] = induction_stripe.mean(dim=(0, 2))


pattern_hook_names_filter = lambda name: name.endswith("pattern")  # noqa: E731
model.run_with_hooks(repeated_tokens, return_type=None, fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)])
fig, ax = plt.subplots(figsize=(4, 6))
image = ax.imshow(induction_score_store, cmap="Blues", vmin=0, aspect="auto")
ax.set_xlabel("head")
ax.set_ylabel("layer")
ax.set_title("induction score")
fig.colorbar(image)
fig.tight_layout()
plt.show()
top = torch.topk(induction_score_store.flatten(), 3)
print("strongest induction heads:", [divmod(int(i), model.cfg.n_heads) for i in top.indices])

# %% [markdown]
# ## `FactoredMatrix`: the OV circuits
#
# `model.OV` is every head's `W_V W_O` as a `FactoredMatrix` (`[layer, head, d_model, d_model]`)
# without multiplying it out. Its eigenvalues give a copying score: positive eigenvalues mean
# the head copies the direction it reads.

# %%
OV_circuit_all_heads = model.OV
print(OV_circuit_all_heads)
eigenvalues = OV_circuit_all_heads.eigenvalues  # [layer, head, d_head]
copying_score = (eigenvalues.sum(-1) / eigenvalues.abs().sum(-1)).real
print("copying score of the strongest induction head:", round(float(copying_score.flatten()[top.indices[0]]), 3))

layer, head = divmod(int(top.indices[0]), model.cfg.n_heads)
sample = torch.randint(0, model.cfg.d_vocab, (200,), generator=torch.Generator().manual_seed(1))
full_OV_circuit_sample = model.W_E[sample] @ OV_circuit_all_heads[layer, head] @ model.W_U[:, sample]
print(type(full_OV_circuit_sample).__name__, full_OV_circuit_sample.shape)
top_1_acc = (full_OV_circuit_sample.AB.argmax(dim=1) == torch.arange(200)).float().mean()
print(f"top-1 accuracy of L{layer}H{head}'s full OV circuit on 200 tokens: {top_1_acc.item():.2f}")
U, S, V = FactoredMatrix(model.W_V[layer, head], model.W_O[layer, head]).svd()
print("largest singular values:", S[:4].round(decimals=3).tolist())

# %% [markdown]
# ## Generation
#
# `generate` samples by default, as in TransformerLens (`do_sample=False` is greedy) and shows a
# progress bar (`verbose=False` hides it).

# %%
torch.manual_seed(0)
print(model.generate("The quick brown fox", max_new_tokens=15, temperature=0.7, verbose=False))
print(model.generate("The quick brown fox", max_new_tokens=15, do_sample=False, verbose=False))

# %% [markdown]
# # Exploratory analysis: indirect object identification
#
# Prompts where the model must name the other person. The metric is the logit difference
# between the right and the wrong name, averaged over prompts.

# %%
prompts = [
    "When John and Mary went to the shops, John gave the bag to",
    "When Tom and James went to the park, James gave the ball to",
    "When Dan and Sid went to the shops, Sid gave an apple to",
    "After Martin and Amy went to the park, Amy gave a drink to",
]
answers = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]
answer_tokens = torch.tensor([[model.to_single_token(a) for a in pair] for pair in answers])
tokens = model.to_tokens(prompts)
original_logits, cache = model.run_with_cache(tokens)


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    return answer_logit_diff if per_prompt else answer_logit_diff.mean()


print("Per prompt logit difference:", logits_to_ave_logit_diff(original_logits, answer_tokens, True).round(decimals=3))
original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)
print("Average logit difference:", round(float(original_average_logit_diff), 3))

# %% [markdown]
# ## Direct logit attribution
#
# The logit difference is the final residual stream, scaled by the final norm, projected on the
# difference of the two unembedding directions. `apply_ln_to_stack` applies the cached scale;
# an integer `pos_slice` selects (and drops) the last position.

# %%
answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)  # [batch, 2, d_model]
logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]
final_residual_stream = cache["resid_post", -1]  # [batch, pos, d_model]
final_token_residual_stream = final_residual_stream[:, -1, :]
scaled_final_token_residual_stream = cache.apply_ln_to_stack(final_token_residual_stream, layer=-1, pos_slice=-1)
average_logit_diff = (scaled_final_token_residual_stream * logit_diff_directions).sum(-1).mean()
print("Calculated average logit diff:", round(float(average_logit_diff), 3))
print("Original logit difference:", round(float(original_average_logit_diff), 3))


def residual_stack_to_logit_diff(residual_stack, cache):
    scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return (scaled_residual_stack * logit_diff_directions).sum(-1).mean(-1)


# %% [markdown]
# ## Logit lens
#
# The residual stream after each sublayer, read through the final norm's scale and the logit
# difference direction: where the answer appears.

# %%
accumulated_residual, labels = cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1, return_labels=True)
logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache)
fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(logit_lens_logit_diffs)
ax.set_xticks(range(0, len(labels), 6), labels[::6])
ax.set_ylabel("logit difference")
ax.set_title("logit difference from the accumulated residual stream")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Layer attribution
#
# `decompose_resid` splits the final stream into the output of each attention and MLP layer.

# %%
per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache)
top_layers = torch.topk(per_layer_logit_diffs, 4)
print({labels[i]: round(float(v), 2) for v, i in zip(top_layers.values, top_layers.indices, strict=True)})

# %% [markdown]
# ## Head attribution
#
# `stack_head_results` splits each attention layer into its heads (`[layer * head, batch, d_model]`
# at the last position).

# %%
per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache)
per_head_logit_diffs = per_head_logit_diffs.reshape(model.cfg.n_layers, model.cfg.n_heads)
fig, ax = plt.subplots(figsize=(4, 6))
bound = float(per_head_logit_diffs.abs().max())
image = ax.imshow(per_head_logit_diffs, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
ax.set_xlabel("head")
ax.set_ylabel("layer")
ax.set_title("logit difference from each head")
fig.colorbar(image)
fig.tight_layout()
plt.show()
top_heads = torch.topk(per_head_logit_diffs.flatten(), 3)
top_positive = [divmod(int(i), model.cfg.n_heads) for i in top_heads.indices]
print("heads that push towards the right name:", [f"L{layer}H{head}" for layer, head in top_positive])

# %% [markdown]
# ## Attention patterns of the top heads
#
# Where the strongest head looks from the last position: the name to predict.

# %%
layer, head = top_positive[0]
str_tokens = model.to_str_tokens(prompts[0])
show_pattern(cache["pattern", layer][0, head], str_tokens, f"L{layer}H{head} on the first prompt")

# %% [markdown]
# ## Activation patching of heads
#
# Corrupt each prompt by making the other name the one who gives, so the right answer swaps,
# then patch in each head's clean output (`z` at every position): heads whose patch restores the
# metric carry the answer.

# %%
corrupted_prompts = [
    "When John and Mary went to the shops, Mary gave the bag to",
    "When Tom and James went to the park, Tom gave the ball to",
    "When Dan and Sid went to the shops, Dan gave an apple to",
    "After Martin and Amy went to the park, Martin gave a drink to",
]
corrupted_tokens = model.to_tokens(corrupted_prompts)
corrupted_average_logit_diff = logits_to_ave_logit_diff(model(corrupted_tokens), answer_tokens)


def ioi_metric(logits, answer_tokens=answer_tokens):
    return (logits_to_ave_logit_diff(logits, answer_tokens) - corrupted_average_logit_diff) / (
        original_average_logit_diff - corrupted_average_logit_diff
    )


attn_head_out_all_pos = patching.get_act_patch_attn_head_out_all_pos(model, corrupted_tokens, cache, ioi_metric)
fig, ax = plt.subplots(figsize=(4, 6))
image = ax.imshow(attn_head_out_all_pos, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
ax.set_xlabel("head")
ax.set_ylabel("layer")
ax.set_title("attn_head_out activation patching (all positions)")
fig.colorbar(image)
fig.tight_layout()
plt.show()
restored = torch.topk(attn_head_out_all_pos.flatten(), 3)
print(
    "heads that restore the most:",
    [f"L{i // model.cfg.n_heads}H{i % model.cfg.n_heads}" for i in restored.indices.tolist()],
)

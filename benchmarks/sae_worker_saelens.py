"""SAELens side of ``benchmarks/sae.py``; runs in ``benchmarks/.venv-tl`` (sae-lens 6.54.12).

    python sae_worker_saelens.py e2e ARCH TOKENS.pt STEPS BATCH LR COEF OUT_DIR BUFFER_TOKENS
    python sae_worker_saelens.py steps ARCH ACTS.pt STEPS BATCH LR COEF

Prints one JSON line with the timing. ``e2e`` trains with ``LanguageModelSAETrainingRunner`` on
the given token rows and saves the SAE (SAELens layout) to OUT_DIR; ``steps`` times SAE
optimisation steps alone on cached activations, as SAELens' trainer does them.

Settings matched to mechscope's where SAELens exposes them: the decoder starts at unit norm
(SAELens' default is 0.1; mechscope initialises unit-norm decoder rows), and the shuffle buffer
holds BUFFER_TOKENS activations (SAELens' buffer is ``n_batches_in_buffer x context_size``
tokens; mechscope's is ``buffer_batches x batch_size``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.set_offline_env()
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

torch.set_num_threads(2)
HOOK = "blocks.6.hook_resid_post"
D_IN, EXPANSION, K = 576, 4, 32


def sae_config(arch: str, coef: float):
    from sae_lens import StandardTrainingSAEConfig, TopKTrainingSAEConfig

    common_kwargs = dict(d_in=D_IN, d_sae=EXPANSION * D_IN, dtype="float32", device="cpu",
                         normalize_activations="none", decoder_init_norm=1.0)  # fmt: skip
    if arch == "topk":
        return TopKTrainingSAEConfig(k=K, **common_kwargs)
    return StandardTrainingSAEConfig(l1_coefficient=coef, l1_warm_up_steps=0, **common_kwargs)


def load_model():
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(common.HF_DIR)
    if path not in loading.OFFICIAL_MODEL_NAMES:
        loading.OFFICIAL_MODEL_NAMES.append(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return HookedTransformer.from_pretrained_no_processing(path, hf_model=hf_model, tokenizer=tokenizer, device="cpu")


def e2e(
    arch: str, tokens_path: str, steps: int, batch: int, lr: float, coef: float, out_dir: str, buffer_tokens: int
) -> dict:
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    model = load_model()
    rows = torch.load(tokens_path, weights_only=True)
    if buffer_tokens % rows.shape[1]:
        raise ValueError(f"buffer of {buffer_tokens} tokens is not a whole number of {rows.shape[1]}-token contexts")
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist()})
    cfg = LanguageModelSAERunnerConfig(
        sae=sae_config(arch, coef), model_name=str(common.HF_DIR), hook_name=HOOK, dataset_path="unused",
        is_dataset_tokenized=True, streaming=False, context_size=rows.shape[1], prepend_bos=False,
        training_tokens=steps * batch, train_batch_size_tokens=batch, store_batch_size_prompts=8,
        n_batches_in_buffer=buffer_tokens // rows.shape[1],
        lr=lr, adam_beta1=0.9, adam_beta2=0.999, lr_warm_up_steps=0, lr_decay_steps=0,
        dead_feature_window=200, feature_sampling_window=1000, device="cpu",
        logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None, output_path=None,
        save_final_checkpoint=False, n_eval_batches=0, verbose=False, seed=0,
    )  # fmt: skip
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=dataset, override_model=model)
    start = time.perf_counter()
    sae = runner.run()
    seconds = time.perf_counter() - start
    sae.save_inference_model(out_dir) if hasattr(sae, "save_inference_model") else sae.save_model(out_dir)
    return {"seconds": seconds, "tokens": steps * batch, "tokens_per_s": steps * batch / seconds}


def sae_steps(arch: str, acts_path: str, steps: int, batch: int, lr: float, coef: float) -> dict:
    from sae_lens.saes.sae import TrainingSAE, TrainStepInput

    acts = torch.load(acts_path, weights_only=True)
    sae = TrainingSAE.from_dict(sae_config(arch, coef).to_dict())
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae.cfg.d_sae)
    coefficients = {"l1": coef} if arch == "standard" else {}

    def step(i: int) -> None:
        x = acts[(i * batch) % (acts.shape[0] - batch) :][:batch]
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coefficients,
                                                       dead_neuron_mask=since_fired > 200, n_training_steps=i,
                                                       is_logging_step=False))  # fmt: skip
        with torch.no_grad():
            fired = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for i in range(3):
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "steps": steps, "steps_per_s": steps / seconds}


if __name__ == "__main__":
    mode, arch = sys.argv[1], sys.argv[2]
    if mode == "e2e":
        path, steps, batch, lr, coef, out, buffer_tokens = sys.argv[3:10]
        result = e2e(arch, path, int(steps), int(batch), float(lr), float(coef), out, int(buffer_tokens))
    else:
        path, steps, batch, lr, coef = sys.argv[3:8]
        result = sae_steps(arch, path, int(steps), int(batch), float(lr), float(coef))
    print(json.dumps(result))

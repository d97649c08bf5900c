"""Decode throughput: fwm's `generate` against transformers `generate` on the same weights (exported with
`save_hf`), greedy, a KV cache, every row producing exactly max_new tokens (no stop ids).

Tokens/s = batch x max_new / the wall time of one whole call (the prompt's prefill included, for both).
"""
from __future__ import annotations

import os
import time

import numpy as np

from fwm.bench import shapes
from fwm.bench.compiles import compilations


def _prompts(vocab: int, batch: int, prompt_len: int) -> np.ndarray:
    return np.random.default_rng(1).integers(3, vocab, (batch, prompt_len)).astype(np.int32)


def _best_call(call, repeats: int) -> tuple[float, object]:
    """(best seconds of `repeats` calls after one warm-up call, the last result)."""
    result, best = call(), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return best, result


def fwm_decode(size: str, batch: int, prompt_len: int, max_new: int, repeats: int, hf_dir: str) -> dict:
    """fwm.rollout.sampler.generate; writes the random weights to hf_dir (save_hf) and the tokens beside them."""
    import jax

    from fwm.model import hf, transformer
    from fwm.rollout import sampler

    cfg = shapes.model_config(size, max(512, prompt_len + max_new))
    params = transformer.init_params(cfg, jax.random.key(0))
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        hf.save_hf(hf_dir, cfg, params)
    prompts = _prompts(cfg.vocab_size, batch, prompt_len).tolist()
    call = lambda: sampler.generate(cfg, params, prompts, max_new)  # noqa: E731
    call()  # compiles; the timed calls then reuse the programs
    programs, before = sampler.compiled_programs(), compilations()
    seconds, samples = _best_call(call, repeats)
    tokens = np.asarray([s.tokens for s in samples], np.int32)
    if tokens.shape != (batch, max_new):
        raise RuntimeError(f"fwm generate returned tokens of shape {tokens.shape}, expected {(batch, max_new)}")
    np.save(os.path.join(hf_dir, f"fwm_tokens_B{batch}.npy"), tokens)
    return {"seconds": seconds, "tokens_per_s": batch * max_new / seconds,
            "compiles_after_warmup": compilations() - before,
            "new_sampler_programs": sum(sampler.compiled_programs().values()) - sum(programs.values())}


def hf_decode(size: str, batch: int, prompt_len: int, max_new: int, repeats: int, hf_dir: str) -> dict:
    """transformers AutoModelForCausalLM.generate on hf_dir: greedy, KV cache, min = max new tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = shapes.model_config(size)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = torch.from_numpy(_prompts(cfg.vocab_size, batch, prompt_len).astype(np.int64))

    def call():
        with torch.inference_mode():
            return model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                                  max_new_tokens=max_new, min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)

    seconds, out = _best_call(call, repeats)
    tokens = out[:, prompt_len:].numpy()
    result = {"seconds": seconds, "tokens_per_s": batch * max_new / seconds, "torch_threads": torch.get_num_threads()}
    ours = os.path.join(hf_dir, f"fwm_tokens_B{batch}.npy")
    if os.path.exists(ours):
        # Same weights, greedy: the first tokens agree unless float noise flips a near-tie argmax.
        result["rows_agreeing_first_8_tokens"] = float(np.mean(np.all(np.load(ours)[:, :8] == tokens[:, :8], axis=1)))
    return result

"""Decode throughput: fwm's `generate` against transformers `generate` on the same weights (exported with
`save_hf`), greedy, a KV cache, every row producing exactly max_new tokens (no stop ids).

Tokens/s = batch x max_new / the wall time of one whole call (the prompt's prefill included, for both).
"""
from __future__ import annotations

import functools
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
    return {**result, **_agreement_with_fwm(hf_dir, tokens)}


def _agreement_with_fwm(hf_dir: str, tokens_BxN: np.ndarray) -> dict:
    """{"rows_agreeing_first_8_tokens": share} against the tokens fwm_decode saved for this batch, if it ran.
    Same weights, greedy: the first tokens agree unless float noise flips a near-tie argmax."""
    ours = os.path.join(hf_dir, f"fwm_tokens_B{len(tokens_BxN)}.npy")
    if not os.path.exists(ours):
        return {}
    return {"rows_agreeing_first_8_tokens": float(np.mean(np.all(np.load(ours)[:, :8] == tokens_BxN[:, :8], axis=1)))}


class _TokenIdText:
    """The text interface tunix's Sampler tokenizes through, over prompts written as space-separated token ids,
    so it decodes exactly the token ids the other decoders get. No BOS (bos_id 0 adds none); pad id 0, which no
    prompt contains (prompt ids start at 3); eos id = vocab size, which argmax never returns (no early stop)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, **_) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(t)) for t in ids)

    def bos_id(self) -> int:
        return 0

    def eos_id(self) -> int:
        return self.vocab_size

    def pad_id(self) -> int:
        return 0


def tunix_decode(size: str, batch: int, prompt_len: int, max_new: int, repeats: int, hf_dir: str) -> dict:
    """google-tunix's `Sampler` (greedy, its KV cache) over its Llama3 model loaded from the same safetensors
    fwm_decode exported (`fwm bench` runs it only where the `bench` extra installed tunix)."""
    import jax.numpy as jnp
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.llama3 import model as tunix_llama, params as tunix_params

    cfg = shapes.model_config(size)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise RuntimeError(f"tunix decode: {hf_dir} has no exported weights; the fwm decode measure writes them first")
    tunix_cfg = tunix_llama.ModelConfig(
        num_layers=cfg.num_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size, hidden_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads, rope_theta=int(cfg.rope_theta),
        norm_eps=cfg.norm_eps, weight_tying=cfg.tie_embeddings)
    # tunix 0.1.6's attention calls apply_rope without the config's rope_theta (its default is 1e6), so
    # its model would not be this one (greedy rows then disagree); bind the config's value. Speed is unchanged.
    tunix_llama.apply_rope = functools.partial(tunix_llama.apply_rope, rope_theta=cfg.rope_theta)
    model = tunix_params.create_model_from_safe_tensors(hf_dir, tunix_cfg, dtype=jnp.float32)
    text = _TokenIdText(cfg.vocab_size)
    decoder = tunix_sampler.Sampler(
        transformer=model, tokenizer=text,
        cache_config=tunix_sampler.CacheConfig(cache_size=prompt_len + max_new, num_layers=cfg.num_layers,
                                               num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim))
    prompts = [text.decode(row) for row in _prompts(cfg.vocab_size, batch, prompt_len)]

    def call():
        return decoder(prompts, max_generation_steps=max_new, max_prompt_length=prompt_len,
                       eos_tokens=[text.eos_id()], temperature=0.0)

    call()  # compiles prefill and decode
    before = compilations()
    seconds, out = _best_call(call, repeats)
    tokens = [np.asarray(t)[:max_new] for t in out.tokens]
    if any(len(t) != max_new for t in tokens):
        raise RuntimeError(f"tunix returned {sorted({len(t) for t in tokens})} new tokens per row, expected {max_new}")
    result = {"seconds": seconds, "tokens_per_s": batch * max_new / seconds,
              "compiles_after_warmup": compilations() - before}
    return {**result, **_agreement_with_fwm(hf_dir, np.stack(tokens))}

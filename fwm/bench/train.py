"""Train step throughput: fwm's `make_train_step` against transformers + PyTorch on the same shape and batch.

Both do forward, backward, global-norm clipping and an AdamW update on a batch x seq_len batch of random
tokens, float32. Tokens/s counts every position (batch x seq_len): what the device computes.
"""
from __future__ import annotations

import time

import numpy as np

from fwm.bench import shapes
from fwm.bench.compiles import compilations

LR, WEIGHT_DECAY, CLIP = 3e-4, 0.1, 1.0


def _tokens(vocab: int, batch: int, seq_len: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)


def _timed(step, warmup: int, steps: int) -> tuple[float, int]:
    """(best seconds per step over `steps` timed calls, compilations during them); `step()` must wait."""
    for _ in range(warmup):
        step()
    before, best = compilations(), float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best, compilations() - before


def fwm_train(size: str, batch: int, seq_len: int, steps: int) -> dict:
    """fwm: the stage's jitted step (state donated, AdamW from fwm.train.state), one device."""
    import jax

    from fwm import config as config_lib
    from fwm.mesh import make_mesh, place_batch
    from fwm.train import state as state_lib
    from fwm.train.steps import make_train_step

    cfg = shapes.model_config(size, max(seq_len, 512))
    config = config_lib.default_config()
    config.data.batch_size, config.data.seq_len = batch, seq_len
    config.optim.update(dict(lr=LR, weight_decay=WEIGHT_DECAY, clip_norm=CLIP, warmup_steps=0, schedule="constant"))
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tx = state_lib.make_optimizer(config.optim, 1000)
    holder = {"state": state_lib.create_state(cfg, tx, mesh, rng=jax.random.key(0))}
    train_step = make_train_step(config, cfg, mesh, "mid_train")
    tokens = _tokens(cfg.vocab_size, batch, seq_len)
    ones = np.ones((batch, seq_len), np.int32)
    placed = place_batch(mesh, {"tokens_BxL": tokens[:, :-1], "targets_BxL": tokens[:, 1:], "segment_ids_BxL": ones,
                                "positions_BxL": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
                                "loss_weights_BxL": ones.astype(np.float32)})

    def step():
        holder["state"], metrics = train_step(holder["state"], placed)
        jax.block_until_ready(metrics)

    seconds, recompiles = _timed(step, 2, steps)
    return {"step_s": seconds, "tokens_per_s": batch * seq_len / seconds, "compiles_after_warmup": recompiles}


def torch_train(size: str, batch: int, seq_len: int, steps: int) -> dict:
    """transformers' LlamaForCausalLM (same shape, untied head, its default attention) with torch AdamW."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = shapes.model_config(size, max(seq_len, 512))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False, attention_bias=False))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=WEIGHT_DECAY)
    tokens = torch.from_numpy(_tokens(cfg.vocab_size, batch, seq_len).astype(np.int64))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()

    seconds, _ = _timed(step, 2, steps)
    return {"step_s": seconds, "tokens_per_s": batch * seq_len / seconds, "torch_threads": torch.get_num_threads()}

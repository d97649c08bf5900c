"""The benchmark's model shapes (Llama: no biases, untied head) and the FLOP count MFU uses."""
from __future__ import annotations

from fwm.model import transformer

# (vocab, width, layers, heads, kv heads, MLP) from issue 14; head_dim = width / heads.
SHAPES: dict[str, tuple[int, int, int, int, int, int]] = {
    "micro": (64, 32, 2, 4, 2, 64),  # the test's shape: compiles and runs in seconds
    "S": (1024, 128, 4, 4, 2, 384),
    "M": (8192, 512, 8, 8, 4, 1536),
    "L": (32000, 768, 12, 12, 4, 2048),
}


def model_config(size: str, max_seq_len: int = 512) -> transformer.ModelConfig:
    if size not in SHAPES:
        raise ValueError(f"unknown benchmark size {size!r}; expected one of {sorted(SHAPES)}")
    vocab, width, layers, heads, kv_heads, mlp = SHAPES[size]
    return transformer.ModelConfig(vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
                                   num_kv_heads=kv_heads, head_dim=width // heads, mlp_dim=mlp,
                                   max_seq_len=max_seq_len)


FLOP_NOTE = ("train FLOPs per token = 6 x matmul parameters (head included, embedding lookup not) "
             "+ 12 x layers x width x sequence (attention, every key)")

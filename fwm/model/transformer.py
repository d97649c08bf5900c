"""ModelConfig and a pure functional decoder-only transformer (Llama/Qwen2 family) that can read a KV cache.

Decoding with the cache (the cache itself, prefill, decode steps) is fwm/model/kv_cache.py.

RMSNorm, RoPE in the Hugging Face half-split convention, grouped-query attention, SwiGLU. Layers are
stacked with `nn.scan` (parameters carry a leading `layers` axis) so compile time does not grow with
depth. Every parameter carries logical axis names (see fwm/mesh.py) so it shards on the mesh.

Dense layers go through `matmul` (a custom gradient that keeps XLA:CPU's transposes cheap) and causal
self-attention without a cache goes by blocks of queries that skip the keys after them
(`causal_self_attention`); both are numerically the plain formulation (tests/test_model.py).

Attention masking is one rule for every mode: a query attends to a key iff both carry the same
non-zero segment id and the key's slot is not after the query's slot. Segment id 0 is padding.
Packed sequences use ids 1..n; left padding uses 0 for the pads; the KV cache keeps one segment id
per cache slot. Positions only feed RoPE, so left-padded rows get each row's own positions.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fwm.mesh import constrain

_DTYPES = ("float32", "bfloat16", "float16")
_REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder. Frozen and hashable: it is a static jit argument."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 172
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    qkv_bias: bool = False
    max_seq_len: int = 2048
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    # None, or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    rope_scaling: tuple | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "mlp_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}; expected one of {_DTYPES}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"ModelConfig.remat_policy={self.remat_policy!r}; expected one of {_REMAT_POLICIES}")
        if self.rope_scaling is not None:
            scaling = tuple(self.rope_scaling)
            if len(scaling) != 5 or scaling[0] != "llama3":
                raise ValueError(
                    "ModelConfig.rope_scaling must be None or ('llama3', factor, low_freq_factor, "
                    f"high_freq_factor, original_max_position_embeddings), got {self.rope_scaling!r}"
                )
            object.__setattr__(self, "rope_scaling", scaling)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = list(self.rope_scaling) if self.rope_scaling is not None else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}; valid keys are {sorted(names)}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = tuple(d["rope_scaling"])
        return cls(**d)


def num_params(cfg: ModelConfig) -> int:
    """Parameter count (embedding included once when tied)."""
    d, h, k, dh, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    attn = d * h * dh * 2 + d * k * dh * 2 + (h * dh + 2 * k * dh if cfg.qkv_bias else 0)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    return cfg.vocab_size * d + cfg.num_layers * per_layer + d + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per trained token: 6 x matmul parameters + 12 x layers x H*Dh x seq_len.

    The embedding lookup is not a matmul; the logit projection is (tied or not). Attention counts every
    key (PaLM's convention), although `causal_self_attention` skips most keys after a query's block.
    """
    matmul_params = num_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)
    # QK^T and PV: 2 matmuls x 2 FLOPs x H*Dh per key, seq_len keys, x3 for forward + backward.
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * matmul_params + attention


def _normal(stddev: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


@jax.custom_vjp
def matmul(x_NxD: jax.Array, kernel_DxF: jax.Array) -> jax.Array:
    """x_NxD @ kernel_DxF, with a backward pass that transposes the activations as one standalone copy.

    The kernel's gradient x^T g contracts over the rows of both operands, so one of them must be
    transposed for the matmul library. Left to itself, XLA:CPU fused that transpose into the elementwise
    producer of g (SiLU's gradient reading the scan's stacked residuals) and wrote it element by element
    with a stride: at the benchmark's M shape those fusions took over a third of the backward pass.
    The barrier keeps the transpose of x a plain copy that XLA emits with its tiled transpose.
    """
    return x_NxD @ kernel_DxF


def _matmul_fwd(x_NxD, kernel_DxF):
    return x_NxD @ kernel_DxF, (x_NxD, kernel_DxF)


def _matmul_bwd(residuals, g_NxF):
    x_NxD, kernel_DxF = residuals
    x_DxN = jax.lax.optimization_barrier(x_NxD).T
    return (g_NxF @ kernel_DxF.T).astype(x_NxD.dtype), (x_DxN @ g_NxF).astype(kernel_DxF.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
    """nn.Dense's parameters (kernel [D, F], optional bias) and numerics, through `matmul`."""

    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x_BxLxD.shape[-1], self.features), self.param_dtype)
        x = x_BxLxD.astype(self.dtype)
        y = matmul(x.reshape(-1, x.shape[-1]), kernel.astype(self.dtype)).reshape(x.shape[:-1] + (self.features,))
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BxLxD.shape[-1],), self.param_dtype,
        )
        x32 = x_BxLxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype before the scale multiply; doing the same keeps bf16 parity.
        return scale.astype(x_BxLxD.dtype) * normed.astype(x_BxLxD.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim/2], float32, with optional llama3 scaling (as in HF)."""
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32) / cfg.head_dim
    inv_freq = (1.0 / (cfg.rope_theta ** exponents)).astype(np.float32)
    if cfg.rope_scaling is None:
        return inv_freq
    _, factor, low_ff, high_ff, old_len = cfg.rope_scaling
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotary embedding, HF half-split convention: x * cos + rotate_half(x) * sin."""
    freqs_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs_BxLxF, freqs_BxLxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_BxLxNxH.dtype), jnp.sin(emb).astype(x_BxLxNxH.dtype)
    half = x_BxLxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxLxNxH[..., half:], x_BxLxNxH[..., :half]], axis=-1)
    return x_BxLxNxH * cos + rotated * sin


def attention_mask(q_seg_BxL, q_slot_BxL, k_seg_BxS, k_slot_S) -> jax.Array:
    """[B, L, S] bool: same non-zero segment and key slot not after the query slot."""
    same = (q_seg_BxL[:, :, None] == k_seg_BxS[:, None, :]) & (k_seg_BxS[:, None, :] != 0)
    causal = k_slot_S[None, None, :] <= q_slot_BxL[:, :, None]
    return same & causal


def _attend_rows(q_BxLxKxGxH: jax.Array, keys: jax.Array, values_BxKxSxH: jax.Array, mask_BxLxS: jax.Array,
                 score_spec: str) -> jax.Array:
    """Grouped-query attention with the G x L query rows of each kv head as the rows m of both matmuls: scores
    `score_spec` (q_BxKxMxH with the keys), then probs_BxKxMxS @ values, each a plain (rows x inner) @ (inner x
    columns) product per (batch, kv head). With `[B, L, K, G, H]` as the einsums' output layout XLA:CPU
    transposed around the matmuls and swapped the operands of the second. Returns out_BxLxKxGxH in the
    queries' dtype; scores and softmax are float32."""
    b, l, k, g, dh = q_BxLxKxGxH.shape
    q_BxKxMxH = q_BxLxKxGxH.transpose(0, 2, 3, 1, 4).reshape(b, k, g * l, dh)  # rows m = (g, l)
    scores = jnp.einsum(score_spec, q_BxKxMxH, keys, preferred_element_type=jnp.float32) / math.sqrt(dh)
    mask_Bx1xMxS = jnp.broadcast_to(mask_BxLxS[:, None, None], (b, 1, g, l, mask_BxLxS.shape[-1])).reshape(
        b, 1, g * l, -1)
    # A finite floor (not -inf) keeps fully masked rows (padding queries) free of NaN.
    scores = jnp.where(mask_Bx1xMxS, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxLxKxGxH.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, values_BxKxSxH)
    return out.reshape(b, k, g, l, dh).transpose(0, 3, 1, 2, 4)


def attend(q_BxLxKxGxH: jax.Array, keys_BxKxSxH: jax.Array, values_BxKxSxH: jax.Array,
           mask_BxLxS: jax.Array) -> jax.Array:
    """Grouped-query attention of the queries over the keys where mask_BxLxS allows; out_BxLxKxGxH.
    One S layer's causal attention forward + backward (8 x 512, 2 kv heads x 2 x 32) took 60 ms in this
    layout against 82 ms with the [B, L, K, G, H] einsum outputs (2 CPU cores)."""
    return _attend_rows(q_BxLxKxGxH, keys_BxKxSxH, values_BxKxSxH, mask_BxLxS, "bkmd,bksd->bkms")


def attend_cache(q_BxLxKxGxH: jax.Array, keys_BxKxHxS: jax.Array, values_BxKxSxH: jax.Array,
                 mask_BxLxS: jax.Array) -> jax.Array:
    """`attend` over a KV cache whose keys are stored transposed (keys_BxKxHxS), which makes the score matmul
    row-major too: at the M benchmark's decode shape (64 rows, 4 kv heads, 320 slots of 64) it took 0.7-0.9 ms
    against 1.3 ms with keys [S, Dh] (2 CPU cores)."""
    return _attend_rows(q_BxLxKxGxH, keys_BxKxHxS, values_BxKxSxH, mask_BxLxS, "bkmd,bkds->bkms")


# Query blocks of causal self-attention: at least this many rows, and at most this many blocks (so the traced
# graph, one pair of matmuls per block, stays small at long sequences).
MIN_QUERY_BLOCK, MAX_QUERY_BLOCKS = 64, 16
# Prefill (a KV cache's first L tokens) uses those blocks from this many tokens: at 64 x 766 tokens on the
# synthetic study's model one softmax over all slots made the prefill 1.7x a training forward of the batch.
PREFILL_BLOCKS_FROM = 512


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[(start, end)) query ranges `causal_self_attention` splits a sequence of `length` into: blocks of
    max(MIN_QUERY_BLOCK, ceil(length / MAX_QUERY_BLOCKS)) rows, the last one shorter."""
    size = max(MIN_QUERY_BLOCK, -(-length // MAX_QUERY_BLOCKS))
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def causal_self_attention(q_BxLxKxGxH, keys_BxKxLxH, values_BxKxLxH, q_seg_BxL, q_slot_BxL, k_seg_BxL) -> jax.Array:
    """Attention of L queries over the same L tokens' keys (no cache), by blocks of queries.

    The query at row slot j attends to key slots <= j only (the callers' slots are the row positions
    0..L-1), so the block of queries [start, end) needs the keys [0, end) and never reads the ones after:
    about half the scores of the full L x L (for 8 blocks, 56%), and each block's scores are small enough to
    stay in cache. On 2 CPU cores one layer's attention forward + backward at the S benchmark's shape
    (8 x 512, 4 heads of 32) took 37-45 ms against 107 ms for one L x L softmax. Same masking rule and result as
    `attend` over the whole sequence (padding queries, which attend to nothing, get a different but
    equally unused value). Returns out_BxLxKxGxH.
    """
    slots_L = jnp.arange(keys_BxKxLxH.shape[2], dtype=jnp.int32)
    outs = []
    for start, end in query_blocks(q_BxLxKxGxH.shape[1]):
        mask_BxQxE = attention_mask(q_seg_BxL[:, start:end], q_slot_BxL[:, start:end], k_seg_BxL[:, :end],
                                    slots_L[:end])
        outs.append(attend(q_BxLxKxGxH[:, start:end], keys_BxKxLxH[:, :, :end], values_BxKxLxH[:, :, :end],
                           mask_BxQxE))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


class Attention(nn.Module):
    """With a KV cache (the layer's own keys_BxKxHxS, values_BxKxSxH and the cache index), the L new keys and
    values are written into it and the updated pair is returned beside the output; without one, causal
    self-attention over the L tokens and None.

    empty_cache: the cache holds nothing before this call (a prefill), so only the L new keys are
    attended to; the cached part would be fully masked and cost L x S scores (and their memory) for nothing."""

    cfg: ModelConfig
    empty_cache: bool = False

    def _proj(self, name: str, features: int, out_axis: str, bias: bool) -> Linear:
        cfg = self.cfg
        return Linear(
            features, use_bias=bias, name=name, dtype=jnp.dtype(cfg.compute_dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            kernel_init=_normal(0.02, ("embed", out_axis)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)),
        )

    @nn.compact
    def __call__(self, x_BxLxD, positions_BxL, q_seg_BxL, q_slot_BxL, k_seg_BxS, kv_cache):
        cfg = self.cfg
        b, l, _ = x_BxLxD.shape
        h, k, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = self._proj("q_proj", h * dh, "heads", cfg.qkv_bias)(x_BxLxD).reshape(b, l, h, dh)
        kk = self._proj("k_proj", k * dh, "kv_heads", cfg.qkv_bias)(x_BxLxD).reshape(b, l, k, dh)
        v = self._proj("v_proj", k * dh, "kv_heads", cfg.qkv_bias)(x_BxLxD).reshape(b, l, k, dh)
        inv_freq = rope_inv_freq(cfg)
        q = apply_rope(q, positions_BxL, inv_freq)
        kk = apply_rope(kk, positions_BxL, inv_freq)
        q_BxLxKxGxH = q.reshape(b, l, k, h // k, dh)
        if kv_cache is None:
            new_kv = None
            # Rematerialised: the backward pass recomputes each block's scores from q, k and v instead of
            # keeping every block's probabilities (B x H x ~L^2/2 floats per layer); on 2 CPU cores the S
            # benchmark's forward + backward got faster (485 -> 433 ms), not slower, as it wrote less memory.
            out = jax.checkpoint(causal_self_attention, prevent_cse=False)(
                q_BxLxKxGxH, kk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_seg_BxL, q_slot_BxL, k_seg_BxS)
        else:
            # Write, then read what was written: the layer's own buffers get the L new keys and values at the
            # cache index and the queries attend over the updated buffers, so the write happens in place.
            # Reading the old buffers and writing them afterwards left XLA free to order the write first, and
            # it copied every buffer every layer of every token to be safe.
            cache_kT, cache_v, start = kv_cache
            new_kT = kk.transpose(0, 2, 3, 1).astype(cache_kT.dtype)  # [B, K, Dh, L]: the cache's key layout
            new_v = v.transpose(0, 2, 1, 3).astype(cache_v.dtype)
            new_kv = (jax.lax.dynamic_update_slice_in_dim(cache_kT, new_kT, start, axis=3),
                      jax.lax.dynamic_update_slice_in_dim(cache_v, new_v, start, axis=2))
            if self.empty_cache:
                # Only the L new tokens exist, at slots 0..L-1. Short prompts: one softmax over them (query
                # blocks made every prefill program compile longer, +22% on the sampler and RL loop tests);
                # from PREFILL_BLOCKS_FROM tokens `causal_self_attention`'s blocks, which skip the scores above
                # the diagonal (PREFILL_BLOCKS_FROM's comment). The keys pass through the cache dtype as cached
                # ones do, so a step sees the same numbers whether a key was written this call or an earlier one.
                new_seg_BxL = jax.lax.dynamic_slice_in_dim(k_seg_BxS, start, l, axis=1)
                if l >= PREFILL_BLOCKS_FROM:
                    out = causal_self_attention(q_BxLxKxGxH, new_kT.astype(q.dtype).transpose(0, 1, 3, 2),
                                                new_v.astype(q.dtype), q_seg_BxL, q_slot_BxL, new_seg_BxL)
                else:
                    new_slots_L = start + jnp.arange(l, dtype=jnp.int32)
                    out = attend_cache(q_BxLxKxGxH, new_kT.astype(q.dtype), new_v.astype(q.dtype),
                                       attention_mask(q_seg_BxL, q_slot_BxL, new_seg_BxL, new_slots_L))
            else:
                slots_S = jnp.arange(cache_v.shape[2], dtype=jnp.int32)
                out = attend_cache(q_BxLxKxGxH, new_kv[0].astype(q.dtype), new_kv[1].astype(q.dtype),
                                   attention_mask(q_seg_BxL, q_slot_BxL, k_seg_BxS, slots_S))
        out = out.reshape(b, l, h * dh)
        out = constrain(out, ("batch", "length", "act_heads"))
        o = Linear(
            cfg.hidden_size, use_bias=False, name="o_proj", dtype=jnp.dtype(cfg.compute_dtype),
            param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_normal(0.02, ("heads", "embed")),
        )(out)
        return o, new_kv


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD):
        cfg = self.cfg
        kw = dict(use_bias=False, dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        gate = Linear(cfg.mlp_dim, name="gate_proj", kernel_init=_normal(0.02, ("embed", "mlp")), **kw)(x_BxLxD)
        up = Linear(cfg.mlp_dim, name="up_proj", kernel_init=_normal(0.02, ("embed", "mlp")), **kw)(x_BxLxD)
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return Linear(cfg.hidden_size, name="down_proj", kernel_init=_normal(0.02, ("mlp", "embed")), **kw)(hidden)


class DecoderBlock(nn.Module):
    """One pre-norm layer: the residual stream in and out, and the layer's KV cache (see Attention)."""

    cfg: ModelConfig
    empty_cache: bool = False

    @nn.compact
    def __call__(self, x_BxLxD, layer_cache, positions_BxL, q_seg_BxL, q_slot_BxL, k_seg_BxS, cache_start):
        cfg = self.cfg
        kv = None if layer_cache is None else (layer_cache[0], layer_cache[1], cache_start)
        normed = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.param_dtype), name="attn_norm")(x_BxLxD)
        attn_out, new_kv = Attention(cfg, self.empty_cache, name="attn")(normed, positions_BxL, q_seg_BxL, q_slot_BxL,
                                                                         k_seg_BxS, kv)
        x_BxLxD = x_BxLxD + attn_out
        normed = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.param_dtype), name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + MLP(cfg, name="mlp")(normed)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        return x_BxLxD, new_kv


def _remat_policy(name: str):
    return {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}[name]


class Transformer(nn.Module):
    """empty_cache: see Attention (prefill into a cache that holds nothing yet).

    unstacked: the layers are separate modules `layer_0`, `layer_1`, ... (parameters from `unstack_params`) run
    in a Python loop; otherwise one `nn.scan` over a stacked `layers` tree (compile time independent of depth,
    the training form). A KV cache needs unstacked: a scanned layer slices its weights and cache out of the
    stacked arrays, and XLA:CPU copies each slice every layer of every decoded token (at the M benchmark shape,
    batch 16, those copies took longer than the matmuls)."""

    cfg: ModelConfig
    empty_cache: bool = False
    unstacked: bool = False

    @nn.compact
    def __call__(self, tokens_BxL, positions_BxL, q_seg_BxL, q_slot_BxL, k_seg_BxS, cache_kv=None, cache_start=0,
                 head=True):
        """Returns (logits_BxLxV float32, the cache): with cache_kv, a sequence of per-layer (keys_BxKxHxS,
        values_BxKxSxH), the list of those pairs with the L new tokens written at cache_start; without, None.
        With head=False the final-normed hidden states x_BxLxD (compute dtype) instead of the logits."""
        if cache_kv is not None and not self.unstacked:
            raise ValueError("Transformer: a KV cache needs unstacked=True (parameters from unstack_params)")
        cfg = self.cfg
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.compute_dtype),
            param_dtype=jnp.dtype(cfg.param_dtype), embedding_init=_normal(0.02, ("vocab", "embed")), name="embed",
        )
        # The table's embed dim is all-gathered (as every layer's weights are inside the scan) before the
        # lookup: gathering rows of a table sharded over fsdp into activations whose batch is also split over
        # fsdp has no efficient SPMD lowering (XLA rematerialises the whole gather output on every device).
        table_VxD = constrain(embed.embedding, ("vocab", None))
        x_BxLxD = constrain(jnp.take(table_VxD, tokens_BxL, axis=0).astype(jnp.dtype(cfg.compute_dtype)),
                            ("batch", "length", "act_embed"))
        block = DecoderBlock
        if cfg.remat_policy != "none":
            # prevent_cse=False is safe (and faster) under scan, which already blocks CSE across iterations.
            block = nn.remat(block, policy=_remat_policy(cfg.remat_policy), prevent_cse=False)
        new_kv = None
        if self.unstacked:
            new_kv = []
            for i in range(cfg.num_layers):
                x_BxLxD, layer_kv = block(cfg, self.empty_cache, name=f"layer_{i}")(
                    x_BxLxD, None if cache_kv is None else cache_kv[i], positions_BxL, q_seg_BxL, q_slot_BxL,
                    k_seg_BxS, cache_start)
                new_kv.append(layer_kv)
        else:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg, self.empty_cache, name="layers")
            x_BxLxD, _ = layers(x_BxLxD, None, positions_BxL, q_seg_BxL, q_slot_BxL, k_seg_BxS, cache_start)
        x_BxLxD = RMSNorm(cfg.norm_eps, jnp.dtype(cfg.param_dtype), name="final_norm")(x_BxLxD)
        if not head:
            return x_BxLxD, new_kv
        if cfg.tie_embeddings:
            logits = embed.attend(x_BxLxD)
        else:
            logits = Linear(
                cfg.vocab_size, use_bias=False, name="lm_head", dtype=jnp.dtype(cfg.compute_dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), kernel_init=_normal(0.02, ("embed", "vocab")),
            )(x_BxLxD)
        logits = constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
        return logits, new_kv


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
    """Positions restarting at 0 at the first token of every segment (padding gets arbitrary positions)."""
    b, l = segment_ids_BxL.shape
    idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    prev = jnp.concatenate([jnp.full((b, 1), -1, segment_ids_BxL.dtype), segment_ids_BxL[:, :-1]], axis=1)
    starts = jnp.where(segment_ids_BxL != prev, idx, 0)
    return idx - jax.lax.cummax(starts, axis=1)


def _dummy_inputs(cfg: ModelConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    ones = jnp.ones((1, 1), jnp.int32)
    return tokens, ones * 0, ones, ones * 0, ones


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh parameters (plain arrays in param_dtype)."""
    variables = Transformer(cfg).init(rng, *_dummy_inputs(cfg))
    return nn.unbox(variables["params"])


def param_logical_axes(cfg: ModelConfig) -> dict:
    """Logical PartitionSpecs (names from fwm.mesh.LOGICAL_AXIS_RULES), same tree as `init_params`."""
    abstract = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), *_dummy_inputs(cfg)))
    return nn.get_partition_spec(abstract)["params"]


def unstack_params(cfg: ModelConfig, params: dict) -> dict:
    """The parameters of `Transformer(cfg, unstacked=True)`: the stacked `layers` tree split into one tree per
    layer (`layer_0`, ...; a copy of the layer weights), everything else shared."""
    if "layers" not in params:
        raise ValueError(f"unstack_params: expected the stacked parameters of init_params (a 'layers' entry), got "
                         f"keys {sorted(params)}")
    out = {name: value for name, value in params.items() if name != "layers"}
    for i in range(cfg.num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda stacked: stacked[i], params["layers"])
    return out


def param_shapes(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the parameters, without allocating them."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def forward(cfg: ModelConfig, params: dict, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None,
            segment_ids_BxL: jax.Array | None = None) -> jax.Array:
    """Full-sequence logits_BxLxV (float32).

    segment_ids_BxL: None (one sequence per row), or packed ids 1..n with 0 for padding.
    positions_BxL: None derives positions restarting per segment.
    """
    tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
    b, l = tokens_BxL.shape
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.ones((b, l), jnp.int32)
    segment_ids_BxL = jnp.asarray(segment_ids_BxL, jnp.int32)
    if positions_BxL is None:
        positions_BxL = positions_from_segments(segment_ids_BxL)
    slots_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    logits, _ = Transformer(cfg).apply(
        {"params": params}, tokens_BxL, jnp.asarray(positions_BxL, jnp.int32), segment_ids_BxL, slots_BxL,
        segment_ids_BxL,
    )
    return logits


def hidden_states(cfg: ModelConfig, params: dict, tokens_BxL: jax.Array, positions_BxL: jax.Array,
                  segment_ids_BxL: jax.Array) -> jax.Array:
    """The final-normed hidden states x_BxLxD (compute dtype) that `forward` turns into logits with
    `output_kernel`: for losses that compute the logits a piece at a time (fwm.train.losses)."""
    b, l = tokens_BxL.shape
    segment_ids_BxL = jnp.asarray(segment_ids_BxL, jnp.int32)
    slots_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    x_BxLxD, _ = Transformer(cfg).apply(
        {"params": params}, jnp.asarray(tokens_BxL, jnp.int32), jnp.asarray(positions_BxL, jnp.int32),
        segment_ids_BxL, slots_BxL, segment_ids_BxL, head=False,
    )
    return x_BxLxD


def output_kernel(cfg: ModelConfig, params: dict) -> jax.Array:
    """The logit projection kernel_DxV (param dtype): the LM head's, or the embedding's transpose when tied."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def resize_vocab(cfg: ModelConfig, params: dict, new_vocab_size: int) -> tuple[ModelConfig, dict]:
    """Grows the embedding (and untied head) to new_vocab_size; new rows are the mean existing row.

    Used when the agent-format tags are new to a checkpoint's tokenizer: the mean row starts the new
    tokens at an "average token" instead of noise, so the initial loss does not spike on them.
    """
    if new_vocab_size < cfg.vocab_size:
        raise ValueError(f"resize_vocab: new size {new_vocab_size} is smaller than {cfg.vocab_size}")
    extra = new_vocab_size - cfg.vocab_size
    if extra == 0:
        return cfg, params
    params = jax.tree.map(lambda x: x, params)  # shallow copy of the nested dicts
    emb = params["embed"]["embedding"]
    mean_row = jnp.mean(emb.astype(jnp.float32), axis=0, keepdims=True).astype(emb.dtype)
    params["embed"] = {"embedding": jnp.concatenate([emb, jnp.repeat(mean_row, extra, axis=0)], axis=0)}
    if not cfg.tie_embeddings:
        head = params["lm_head"]["kernel"]
        mean_col = jnp.mean(head.astype(jnp.float32), axis=1, keepdims=True).astype(head.dtype)
        params["lm_head"] = {"kernel": jnp.concatenate([head, jnp.repeat(mean_col, extra, axis=1)], axis=1)}
    return dataclasses.replace(cfg, vocab_size=new_vocab_size), params

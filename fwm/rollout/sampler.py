"""The sampler: jitted prefill of left-padded prompts, then a `lax.while_loop` decode over the KV cache.

`generate(cfg, params, prompts, max_new_tokens, ...)` takes prompts as lists of token ids (each
starting the way SFT samples start: BOS, then the prompt's ids; see fwm/data/features.py sft_example)
and returns one `Sample` per prompt: the new token ids up to and including the first stop id, and
per token two log-probabilities:
- `logprobs`: log-softmax of the model's raw logits (temperature 1, no top-k / top-p) at the sampled
  token -- the policy's own log pi(a|s), what an RL ratio needs (old-policy log-probs);
- `sampling_logprobs`: the log-probability under the distribution actually sampled from (after
  temperature, top-k, top-p); 0 for greedy. An importance weight for the sampling distortion is
  `logprobs - sampling_logprobs`.

Shapes are bucketed so a stream of calls compiles a handful of programs: prompts are left-padded to a
power-of-two length (at least `MIN_PROMPT_BUCKET`, at most what leaves room for the budget), the
batch is padded to a power of two and to a multiple of the mesh's data-parallel size. jax.jit caches
one program per (prompt bucket, batch bucket, max_new_tokens, sampling mode, stop ids); temperature and
top_p are traced values, so changing them does not recompile. The KV cache is created by a jitted
initialiser with the cache's shardings and donated to prefill and to the decode loop (no copy).

Every row samples with its own key (one key per prompt, or one key split per prompt), so a prompt's
continuation does not depend on the other rows of its batch. With several processes `generate` is a
collective call: each process brings its own prompts (or none) and gets their samples back; the
processes agree on the prompt bucket and the rows per process, and each process's rows are placed into
one global batch (fwm.mesh.place_batch) and read back from it (fwm.mesh.local_rows).

`score_continuations(cfg, params, prompts, continuations)` scores rather than samples: log p(continuation |
prompt) for every pair, each prompt prefilled once and its cache branched over the continuations (E[q] of the
<confidence> values, fwm.eval.expected_q).

The decode loop stops when every row has produced a stop id or max_new_tokens tokens. A prompt plus
max_new_tokens longer than model.max_seq_len (the cache) is a ValueError, never a silent overwrite.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from fwm.mesh import constrain, local_rows, logical_to_sharding, make_mesh, place_batch, process_reduce, replicated
from fwm.model import kv_cache, transformer

MIN_PROMPT_BUCKET = 16
_NEG_INF = -1e30  # masked logits (finite: keeps softmax free of NaN when a row masks everything but one)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt's continuation. tokens: the new ids, up to and including the first stop id.
    logprobs / sampling_logprobs: one per token (see the module doc; None for a scripted policy,
    which has no token distribution). stopped: ended on a stop id (else the budget ran out)."""

    tokens: list[int]
    logprobs: list[float] | None
    sampling_logprobs: list[float] | None
    stopped: bool


class SamplingMode(NamedTuple):
    """The static (compiled-in) part of the sampling choice."""

    greedy: bool
    top_k: int | None
    use_top_p: bool


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def prompt_bucket(longest: int, max_new_tokens: int, max_seq_len: int) -> int:
    """Left-padded prompt length: the next power of two >= longest (>= MIN_PROMPT_BUCKET), capped so
    that bucket + max_new_tokens fits max_seq_len. ValueError if even the longest prompt does not fit."""
    if longest + max_new_tokens > max_seq_len:
        raise ValueError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs {longest + max_new_tokens}"
                         f" cache slots, more than model.max_seq_len={max_seq_len}; shorten the prompt (prompt "
                         f"budget) or the generation budget")
    return min(max(_next_power_of_two(longest), MIN_PROMPT_BUCKET), max_seq_len - max_new_tokens)


def batch_bucket(batch: int, data_parallel: int) -> int:
    """Padded batch: the next power of two >= batch, rounded up to a multiple of the data-parallel size."""
    padded = _next_power_of_two(batch)
    return -(-padded // data_parallel) * data_parallel


def data_parallel_size(mesh: Mesh) -> int:
    """Rows are split over (data, fsdp), as in training (fwm.mesh 'batch' rule)."""
    return int(mesh.shape["data"]) * int(mesh.shape["fsdp"])


# ---------------------------------------------------------------------------------------- sampling
def _filter_logits(logits_BxV: jax.Array, temperature: jax.Array, top_p: jax.Array, mode: SamplingMode) -> jax.Array:
    """Logits of the distribution to sample from: / temperature, then top-k, then top-p (nucleus)."""
    scaled = logits_BxV / temperature
    if mode.top_k is not None and mode.top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, mode.top_k)[0][:, -1:]
        scaled = jnp.where(scaled >= kth, scaled, _NEG_INF)
    if mode.use_top_p:
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass before it is < top_p: the smallest prefix reaching top_p (the first always).
        keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(scaled.shape[0])[:, None], order].set(keep_sorted)
        scaled = jnp.where(keep, scaled, _NEG_INF)
    return scaled


def _sample(logits_BxV: jax.Array, keys_B: jax.Array, temperature: jax.Array, top_p: jax.Array,
            mode: SamplingMode) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(tokens_B, raw log-probs_B, sampling log-probs_B) for one step; row b draws with keys_B[b] only."""
    raw_logprobs_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    if mode.greedy:
        tokens_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        sampling_B = jnp.zeros(tokens_B.shape, jnp.float32)
    else:
        filtered_BxV = _filter_logits(logits_BxV, temperature, top_p, mode)
        # One key per row: a row's tokens do not depend on the rows beside it (batch size, padding,
        # which process holds it), so an episode samples the same continuation in any batch.
        tokens_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BxV).astype(jnp.int32)
        sampling_B = jnp.take_along_axis(jax.nn.log_softmax(filtered_BxV, axis=-1), tokens_B[:, None], axis=-1)[:, 0]
    raw_B = jnp.take_along_axis(raw_logprobs_BxV, tokens_B[:, None], axis=-1)[:, 0]
    return tokens_B, raw_B, sampling_B


# ------------------------------------------------------------------------------------- jitted parts
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_cache(cfg: transformer.ModelConfig, batch: int, length: int) -> kv_cache.KVCache:
    """An empty cache created in place with its shardings: rows over (data, fsdp), so each data-parallel
    shard keeps the keys of the rows it decodes; kv heads over tensor, beside the heads' projections."""
    cache = kv_cache.init_cache(cfg, batch, length)
    return jax.tree.map(lambda spec, x: constrain(x, tuple(spec)), kv_cache.cache_logical_axes(cfg), cache,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill(cfg: transformer.ModelConfig, params: dict, cache: kv_cache.KVCache, tokens_BxL: jax.Array,
             valid_BxL: jax.Array) -> tuple[jax.Array, kv_cache.KVCache, jax.Array]:
    """Writes the prompts; returns (logits of the last prompt slot, cache, next positions)."""
    logits_BxLxV, cache, positions_B = kv_cache.prefill(cfg, params, cache, tokens_BxL, valid_BxL)
    return logits_BxLxV[:, -1], cache, positions_B  # left padding: the last slot is every row's last token


class _LoopState(NamedTuple):
    step: jax.Array
    cache: kv_cache.KVCache
    logits_BxV: jax.Array
    positions_B: jax.Array
    done_B: jax.Array
    tokens_BxN: jax.Array
    logprobs_BxN: jax.Array
    sampling_BxN: jax.Array
    lengths_B: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(5,))
def _decode(cfg: transformer.ModelConfig, mode: SamplingMode, max_new: int, stop_ids: tuple[int, ...], params: dict,
            cache: kv_cache.KVCache, logits_BxV: jax.Array, positions_B: jax.Array, key_data_BxK: jax.Array,
            temperature: jax.Array, top_p: jax.Array, row_live_B: jax.Array):
    """Samples up to max_new tokens per row (row b from the key whose data is key_data_BxK[b]); rows that
    stopped keep stepping (masked) until all have."""
    b = logits_BxV.shape[0]
    keys_B = jax.random.wrap_key_data(key_data_BxK)
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)

    def cond(state: _LoopState) -> jax.Array:
        return (state.step < max_new) & ~jnp.all(state.done_B)

    def body(state: _LoopState) -> _LoopState:
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, state.step)
        tokens_B, raw_B, sampling_B = _sample(state.logits_BxV, step_keys_B, temperature, top_p, mode)
        live_B = ~state.done_B
        tokens_B = jnp.where(live_B, tokens_B, 0)
        column = lambda array, values: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            array, values[:, None].astype(array.dtype), state.step, axis=1)
        done_B = state.done_B | jnp.isin(tokens_B, stops)
        logits_BxV, cache = kv_cache.decode_step(cfg, params, state.cache, tokens_B, state.positions_B)
        return _LoopState(state.step + 1, cache, logits_BxV, state.positions_B + 1, done_B,
                          column(state.tokens_BxN, tokens_B), column(state.logprobs_BxN, jnp.where(live_B, raw_B, 0.0)),
                          column(state.sampling_BxN, jnp.where(live_B, sampling_B, 0.0)),
                          state.lengths_B + live_B.astype(jnp.int32))

    params = kv_cache.decode_params(cfg, params)  # split once, not every step
    init = _LoopState(jnp.zeros((), jnp.int32), cache, logits_BxV, positions_B, ~row_live_B,
                      jnp.zeros((b, max_new), jnp.int32), jnp.zeros((b, max_new), jnp.float32),
                      jnp.zeros((b, max_new), jnp.float32), jnp.zeros((b,), jnp.int32))
    final = jax.lax.while_loop(cond, body, init)
    return final.tokens_BxN, final.logprobs_BxN, final.sampling_BxN, final.lengths_B, final.done_B


@functools.lru_cache(maxsize=16)
def _param_shardings(cfg: transformer.ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings of the parameters by the training rules (fsdp / tensor). Memoised like a jit cache:
    deriving the logical axes traces the model's init (~0.1 s), more than a short decode takes."""
    return logical_to_sharding(transformer.param_logical_axes(cfg), mesh, transformer.param_shapes(cfg))


def compiled_programs() -> dict[str, int]:
    """How many programs each jitted part holds (a test hook: equal before and after a same-bucket call)."""
    return {"init_cache": _init_cache._cache_size(), "prefill": _prefill._cache_size(),
            "decode": _decode._cache_size()}


# ------------------------------------------------------------------------------------------- public
def _check_arguments(cfg: transformer.ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not prompts and jax.process_count() == 1:  # several processes: this one may have none this call
        raise ValueError("generate: no prompts")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"generate: prompt {i} is empty (prompts start with BOS)")
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= cfg.vocab_size:
            raise ValueError(f"generate: prompt {i} holds token id {low if low < 0 else high} outside "
                             f"[0, vocab_size={cfg.vocab_size})")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be None or >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p}")


def _row_key_data(rng: jax.Array | None, rows: int, num_prompts: int) -> np.ndarray:
    """The raw data of one key per row (rows x key size), padding rows after the prompts' keys.
    rng: one key (split into a key per prompt) or a key per prompt (shape (num_prompts,)); None: greedy."""
    if rng is None:
        rng = jax.random.key(0)  # greedy decoding draws nothing; the rows still need a key each
    if rng.shape == ():
        rng = jax.random.split(rng, num_prompts)
    if rng.shape != (num_prompts,):
        raise ValueError(f"generate: rng must be one key or one key per prompt ({num_prompts}), got shape {rng.shape}")
    data = np.asarray(jax.random.key_data(rng))
    return np.concatenate([data, np.zeros((rows - num_prompts,) + data.shape[1:], data.dtype)])


def generate(cfg: transformer.ModelConfig, params: dict, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: Sequence[int] = (), rng: jax.Array | None = None, mesh: Mesh | None = None) -> list[Sample]:
    """Continuations of `prompts` (lists of token ids, BOS first); one Sample per prompt, in order.

    temperature 0 is greedy (top_k, top_p and rng are then ignored); otherwise rng is required: one jax
    key (split into one per prompt) or a key array with one key per prompt (a prompt's continuation then
    depends on its key alone, not on the batch it is in). mesh: where to run (default: every device on
    the data axis); params are placed on it by fwm.mesh's rules (a no-op when they already are).

    Several processes (a mesh over every process's devices): a collective call. Every process passes
    its own prompts (possibly none) and gets their samples; the processes agree on the prompt bucket
    and the rows per process (the largest process's), so all run the same programs on one global
    batch, this process's rows placed by fwm.mesh.place_batch. Each process must call generate as often
    as the others.
    """
    _check_arguments(cfg, prompts, max_new_tokens, temperature, top_k, top_p)
    greedy = temperature == 0.0
    if not greedy and rng is None and prompts:
        raise ValueError("generate: sampling with temperature > 0 needs rng (a jax.random key)")
    mode = SamplingMode(greedy, None if greedy else top_k, (not greedy) and top_p is not None and top_p < 1.0)
    mesh = mesh if mesh is not None else make_mesh()
    processes = jax.process_count()
    # One process: its own sizes. Several: the largest process's (an empty process has longest 1: BOS).
    longest, count = (int(n) for n in process_reduce([max((len(p) for p in prompts), default=1), len(prompts)]))
    length = prompt_bucket(longest, max_new_tokens, cfg.max_seq_len)
    data_parallel = data_parallel_size(mesh)
    if data_parallel % processes:
        raise ValueError(f"generate: the mesh's data-parallel size {data_parallel} (data x fsdp) does not split "
                         f"over {processes} processes; each process decodes its own rows")
    batch = batch_bucket(count, data_parallel // processes)  # this process's rows

    tokens_BxL = np.zeros((batch, length), np.int32)
    valid_BxL = np.zeros((batch, length), bool)
    for row, prompt in enumerate(prompts):  # left padding: every row's last token sits in the last slot
        tokens_BxL[row, length - len(prompt):] = prompt
        valid_BxL[row, length - len(prompt):] = True
    row_live_B = np.arange(batch) < len(prompts)
    valid_BxL[~row_live_B, -1] = True  # padding rows hold one dummy token so their attention is not empty
    key_data_BxK = _row_key_data(rng, batch, len(prompts))

    with jax.set_mesh(mesh), warnings.catch_warnings():
        # CPU backends cannot donate; the cache is then copied, which is correct, just not free.
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        # Parameters by the training rules (fsdp / tensor): no second layout to keep in memory or to convert.
        # Prompt rows over (data, fsdp) like a training batch: decoding is data-parallel over rows.
        params = jax.device_put(params, _param_shardings(cfg, mesh))
        rows = place_batch(mesh, {"tokens": tokens_BxL, "valid": valid_BxL, "keys": key_data_BxK, "live": row_live_B})
        cache = _init_cache(cfg, batch * processes, length + max_new_tokens)
        logits_BxV, cache, positions_B = _prefill(cfg, params, cache, rows["tokens"], rows["valid"])
        # The sampling scalars are replicated (host values: every process puts the same); the keys go with their rows.
        outputs = _decode(cfg, mode, int(max_new_tokens), tuple(sorted({int(i) for i in stop_ids})), params, cache,
                          logits_BxV, positions_B, rows["keys"],
                          jax.device_put(np.float32(max(temperature, 1e-6)), replicated(mesh)),
                          jax.device_put(np.float32(top_p if top_p is not None else 1.0), replicated(mesh)),
                          rows["live"])
    tokens_BxN, logprobs_BxN, sampling_BxN, lengths_B, done_B = (local_rows(x) for x in outputs)
    return [Sample(tokens=tokens_BxN[row, :lengths_B[row]].tolist(),
                   logprobs=logprobs_BxN[row, :lengths_B[row]].tolist(),
                   sampling_logprobs=sampling_BxN[row, :lengths_B[row]].tolist(),
                   stopped=bool(done_B[row]))  # a real row is done only by a stop id
            for row in range(len(prompts))]


# ---------------------------------------------------------------------------------- scoring branches
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _score_branches(cfg: transformer.ModelConfig, params: dict, cache: kv_cache.KVCache, tokens_BxL: jax.Array,
                    valid_BxL: jax.Array, branches_BxVxC: jax.Array, branch_valid_BxVxC: jax.Array) -> jax.Array:
    """log p(branch_v | prompt_b) summed over each branch's valid tokens, BxV: one prefill of the prompts, its
    cache repeated for the V branches, the first C - 1 branch tokens appended in one extend."""
    logits_BxLxV, cache, positions_B = kv_cache.prefill(cfg, params, cache, tokens_BxL, valid_BxL)
    b, v, c = branches_BxVxC.shape
    tokens_RxC = branches_BxVxC.reshape(b * v, c)
    first_logp_BxT = jax.nn.log_softmax(logits_BxLxV[:, -1])  # the prompt's last slot predicts token 0
    logp_RxC = jnp.take_along_axis(jnp.repeat(first_logp_BxT, v, axis=0), tokens_RxC[:, :1], axis=1)
    if c > 1:
        # Branch rows sit next to their prompt's row, so the repeated cache stays on the prompt's data shard.
        repeat = lambda x: jnp.repeat(x, v, axis=0)  # noqa: E731
        cache = kv_cache.KVCache(tuple(map(repeat, cache.k)), tuple(map(repeat, cache.v)),
                                 repeat(cache.segment_ids_BxS), cache.index)
        positions_RxC = repeat(positions_B)[:, None] + jnp.arange(c - 1, dtype=jnp.int32)[None]
        # Right padding of short branches is harmless: causal attention never lets a valid token see it.
        logits_RxCxT, _ = kv_cache.extend(cfg, params, cache, tokens_RxC[:, :-1], positions_RxC,
                                          branch_valid_BxVxC.reshape(b * v, c)[:, :-1])
        rest_RxC = jnp.take_along_axis(jax.nn.log_softmax(logits_RxCxT), tokens_RxC[:, 1:, None], axis=2)[..., 0]
        logp_RxC = jnp.concatenate([logp_RxC, rest_RxC], axis=1)
    return jnp.sum(jnp.where(branch_valid_BxVxC.reshape(b * v, c), logp_RxC, 0.0), axis=1).reshape(b, v)


def score_continuations(cfg: transformer.ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], prompts_per_call: int = 64,
                        mesh: Mesh | None = None) -> np.ndarray:
    """log p(continuation_v | prompt_n) for every prompt and continuation, NxV float64 (NaN where prompt +
    continuation minus its last token exceeds cfg.max_seq_len: the model never reads a continuation's last token).

    Each prompt is prefilled once and its KV cache branched over the V continuations (a few tokens each, such as
    the values a <confidence> span could hold): the cost of about one forward pass per prompt, not V. Prompts are
    grouped by length and padded as `generate` pads them, `prompts_per_call` to a call (each prefilled row
    branches into V rows). One process (several: ValueError).
    """
    if jax.process_count() > 1:
        raise ValueError("score_continuations: one process only (each process would bring different prompts)")
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError(f"score_continuations: expected non-empty continuations, got {list(continuations)!r}")
    for kind, sequences in (("prompt", prompts), ("continuation", continuations)):
        for i, ids in enumerate(sequences):
            if len(ids) and (min(ids) < 0 or max(ids) >= cfg.vocab_size):
                raise ValueError(f"score_continuations: {kind} {i} holds a token id outside [0, vocab_size="
                                 f"{cfg.vocab_size})")
    if prompts_per_call < 1:
        raise ValueError(f"score_continuations: prompts_per_call must be >= 1, got {prompts_per_call}")
    num_v, width = len(continuations), max(len(c) for c in continuations)
    out_NxV = np.full((len(prompts), num_v), np.nan)
    # room: the longest continuation a prompt can take (its last token is never read)
    room = {n: cfg.max_seq_len - len(p) + 1 for n, p in enumerate(prompts) if len(p)}
    groups: dict[int, list[int]] = {}
    for n, r in room.items():
        fits = min(width, r)
        if fits >= 1:
            groups.setdefault(fits, []).append(n)
    mesh = mesh if mesh is not None else make_mesh()
    data_parallel = data_parallel_size(mesh)
    with jax.set_mesh(mesh), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        params = jax.device_put(params, _param_shardings(cfg, mesh))
        for fits, members in sorted(groups.items()):
            kept = [v for v, c in enumerate(continuations) if len(c) <= fits]
            if not kept:
                continue
            c = max(len(continuations[v]) for v in kept)
            branches_VxC = np.zeros((len(kept), c), np.int32)
            branch_valid_VxC = np.zeros((len(kept), c), bool)
            for j, v in enumerate(kept):
                branches_VxC[j, :len(continuations[v])] = continuations[v]
                branch_valid_VxC[j, :len(continuations[v])] = True
            members.sort(key=lambda n: len(prompts[n]))
            for start in range(0, len(members), prompts_per_call):
                chunk = members[start:start + prompts_per_call]
                length = prompt_bucket(max(len(prompts[n]) for n in chunk), c - 1, cfg.max_seq_len)
                batch = batch_bucket(len(chunk), data_parallel)
                tokens_BxL = np.zeros((batch, length), np.int32)
                valid_BxL = np.zeros((batch, length), bool)
                for row, n in enumerate(chunk):
                    tokens_BxL[row, length - len(prompts[n]):] = prompts[n]
                    valid_BxL[row, length - len(prompts[n]):] = True
                valid_BxL[len(chunk):, -1] = True  # padding rows: one dummy token, so attention is not empty
                rows = place_batch(mesh, {"tokens": tokens_BxL, "valid": valid_BxL,
                                          "branches": np.repeat(branches_VxC[None], batch, axis=0),
                                          "branch_valid": np.repeat(branch_valid_VxC[None], batch, axis=0)})
                cache = _init_cache(cfg, batch, length + c - 1)
                logp_BxV = local_rows(_score_branches(cfg, params, cache, rows["tokens"], rows["valid"],
                                                      rows["branches"], rows["branch_valid"]))
                for row, n in enumerate(chunk):
                    out_NxV[n, kept] = logp_BxV[row]
    return out_NxV

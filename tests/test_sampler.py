"""The sampler: greedy equals step-by-step argmax of the full forward, buckets reuse compiled programs,
over-long prompts fail clearly, top-k / top-p restrict the support, log-probabilities are the model's."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwm.mesh import make_mesh
from fwm.model import transformer
from fwm.rollout import sampler

CFG = transformer.ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                              mlp_dim=64, max_seq_len=64)


@pytest.fixture(scope="module")
def params():
    # A larger init scale than the default 0.02 so the random model's distributions are far from uniform
    # (top token ~0.4 here) and argmax ties cannot happen.
    p = transformer.init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 10.0 if x.ndim > 1 else x, p)


def _prompts(rng, lengths):
    return [[1] + rng.integers(2, CFG.vocab_size, n - 1).tolist() for n in lengths]


_forward = jax.jit(transformer.forward, static_argnums=0)


def _greedy_reference(params, prompt, n):
    """Step-by-step argmax of the full forward (right-padded to a fixed length: causal, so the padding
    after position t does not change its logits, and one compiled program serves every step)."""
    tokens, out, logprobs = list(prompt), [], []
    for _ in range(n):
        padded = np.zeros((1, CFG.max_seq_len), np.int32)
        padded[0, :len(tokens)] = tokens
        logits = _forward(CFG, params, jnp.asarray(padded))[0, len(tokens) - 1]
        token = int(jnp.argmax(logits))
        out.append(token)
        logprobs.append(float(jax.nn.log_softmax(logits)[token]))
        tokens.append(token)
    return out, logprobs


def test_greedy_equals_full_forward_argmax_with_left_padding(params):
    prompts = _prompts(np.random.default_rng(0), [3, 9, 5])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    samples = sampler.generate(CFG, params, prompts, max_new_tokens=6, mesh=mesh)
    for prompt, sample in zip(prompts, samples):
        tokens, logprobs = _greedy_reference(params, prompt, 6)
        assert sample.tokens == tokens
        np.testing.assert_allclose(sample.logprobs, logprobs, atol=1e-4)
        assert sample.sampling_logprobs == [0.0] * 6 and not sample.stopped


def test_stop_ids_end_each_row_at_its_first_stop(params):
    prompts = _prompts(np.random.default_rng(1), [4, 6, 2, 7, 3])
    free = sampler.generate(CFG, params, prompts, max_new_tokens=6)
    cut_at = next(i for i, t in enumerate(free[0].tokens) if i > 0 and t not in free[0].tokens[:i])
    stop = free[0].tokens[cut_at]  # row 0 stops there; other rows wherever (if ever) it appears
    stopped = sampler.generate(CFG, params, prompts, max_new_tokens=6, stop_ids=(stop,))
    for full, cut in zip(free, stopped):
        end = full.tokens.index(stop) + 1 if stop in full.tokens else len(full.tokens)
        assert cut.tokens == full.tokens[:end]
        assert cut.stopped == (stop in full.tokens)
        assert len(cut.logprobs) == len(cut.tokens)
    assert stopped[0].stopped and len(stopped[0].tokens) == cut_at + 1


def test_second_call_in_the_same_bucket_does_not_compile(params):
    rng = np.random.default_rng(2)
    mesh = make_mesh()
    sampler.generate(CFG, params, _prompts(rng, [5, 17, 20]), max_new_tokens=6, mesh=mesh)  # bucket 32, batch 8
    before = sampler.compiled_programs()
    out = sampler.generate(CFG, params, _prompts(rng, [30, 2]), max_new_tokens=6, mesh=mesh)  # same buckets
    assert sampler.compiled_programs() == before
    assert [len(s.tokens) for s in out] == [6, 6]
    sampler.generate(CFG, params, _prompts(rng, [40]), max_new_tokens=6, mesh=mesh)  # a new prompt bucket
    assert sampler.compiled_programs()["prefill"] == before["prefill"] + 1


def test_prompt_plus_budget_beyond_the_cache_is_an_error(params):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        sampler.generate(CFG, params, [[1] * 60], max_new_tokens=5)
    # Exactly full is fine: the bucket shrinks to what leaves room for the budget.
    assert len(sampler.generate(CFG, params, [[1] * 59], max_new_tokens=5)[0].tokens) == 5
    assert sampler.prompt_bucket(33, 5, 64) == 59 and sampler.prompt_bucket(3, 5, 64) == 16


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.5)])
def test_top_k_and_top_p_restrict_the_support(params, top_k, top_p):
    prompt = _prompts(np.random.default_rng(3), [6])[0]
    logits = transformer.forward(CFG, params, jnp.asarray([prompt]))[0, -1]
    probs = np.asarray(jax.nn.softmax(logits))
    order = np.argsort(-probs)
    if top_k is not None:
        allowed = set(order[:top_k].tolist())
    else:
        before = np.cumsum(probs[order]) - probs[order]
        allowed = set(order[before < top_p].tolist())
    assert len(allowed) < CFG.vocab_size // 2
    samples = sampler.generate(CFG, params, [prompt] * 64, max_new_tokens=1, temperature=1.0, top_k=top_k,
                               top_p=top_p, rng=jax.random.key(0))
    first = {s.tokens[0] for s in samples}
    assert first <= allowed and len(first) > 1
    for s in samples:  # raw log-probs are the model's; sampling log-probs are renormalised over the support
        assert s.logprobs[0] == pytest.approx(float(np.log(probs[s.tokens[0]])), abs=1e-4)
        renormalised = probs[s.tokens[0]] / sum(probs[i] for i in allowed)
        assert s.sampling_logprobs[0] == pytest.approx(float(np.log(renormalised)), abs=1e-4)
    unrestricted = sampler.generate(CFG, params, [prompt] * 64, max_new_tokens=1, temperature=1.0,
                                    rng=jax.random.key(0))
    assert not {s.tokens[0] for s in unrestricted} <= allowed


def test_bad_arguments_are_errors(params):
    with pytest.raises(ValueError, match="needs rng"):
        sampler.generate(CFG, params, [[1, 2]], max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="outside"):
        sampler.generate(CFG, params, [[1, CFG.vocab_size]], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate(CFG, params, [[]], max_new_tokens=2)


def test_a_key_per_prompt_makes_a_continuation_independent_of_its_batch(params):
    prompts = _prompts(np.random.default_rng(5), [4, 11, 7])
    keys = jax.vmap(jax.random.key)(np.asarray([10, 11, 12], np.int32))
    together = sampler.generate(CFG, params, prompts, max_new_tokens=6, temperature=1.0, rng=keys)
    alone = sampler.generate(CFG, params, prompts[1:2], max_new_tokens=6, temperature=1.0, rng=keys[1:2])
    assert alone[0].tokens == together[1].tokens
    np.testing.assert_allclose(alone[0].logprobs, together[1].logprobs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one key per prompt"):
        sampler.generate(CFG, params, prompts, max_new_tokens=2, temperature=1.0, rng=keys[:2])

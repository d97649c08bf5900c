"""E[q] from the model's probabilities of the <confidence> values (fwm.eval.expected_q), by hand and against
direct scoring of each whole sequence on a tiny random model (fwm.rollout.sampler.score_continuations)."""
import jax
import numpy as np
import pytest

from fwm.eval import expected_q
from fwm.model import transformer as T
from fwm.mesh import make_mesh
from fwm.rollout import sampler
from fwm.schema import ALL_TAG_TOKENS
from fwm.tokenizer import train_sentencepiece
from fwm.train.losses import batch_logits, target_nll


def test_expected_from_logprobs_by_hand():
    values = [0, 50, 100]
    # p = 0.1, 0.2, 0.3 (mass 0.6): E[q] = (0 * 0.1 + 0.5 * 0.2 + 1 * 0.3) / 0.6 = 2/3.
    expected, mass = expected_q.expected_from_logprobs(np.log([[0.1, 0.2, 0.3], [1.0, 0.0 + 1e-300, 1e-300]]), values)
    np.testing.assert_allclose(expected, [2 / 3, 0.0], atol=1e-12)
    np.testing.assert_allclose(mass, [0.6, 1.0])
    # Tiny probabilities (long prompts): the ratio stays exact where exp() alone would underflow to 0 / 0.
    expected, mass = expected_q.expected_from_logprobs(np.asarray([[-2000.0, -2000.0, -1e9]]), values)
    np.testing.assert_allclose(expected, [0.25]) and np.testing.assert_allclose(mass, [0.0])


def test_value_tokens_and_the_prefix(tmp_path):
    texts = [f"<imaginary>plan {i}</imaginary><confidence>{(7 * i) % 101}</confidence><think>x</think>"
             for i in range(300)]
    tokenizer = train_sentencepiece(texts, str(tmp_path / "tok.model"), 300)
    close_id = tokenizer.tag_ids["</confidence>"]
    candidates = expected_q.value_token_ids(tokenizer, [0, 7, 100])
    assert all(c[-1] == close_id and len(c) >= 2 for c in candidates)
    assert tokenizer.decode(candidates[2][:-1]) == "100"
    # The candidates are the tokens a whole rendered block holds between the tags.
    block = tokenizer.encode("<analysis>a</analysis><confidence>100</confidence><think>")
    open_id = tokenizer.tag_ids["<confidence>"]
    assert block[block.index(open_id) + 1:block.index(close_id) + 1] == candidates[2]
    assert expected_q.confidence_prefix([2, 5], block, open_id) == [2, 5] + block[:block.index(open_id) + 1]
    assert expected_q.confidence_prefix([2, 5], [7, 8], open_id) is None
    assert set(ALL_TAG_TOKENS) <= set(tokenizer.tag_ids)


def test_score_continuations_equal_direct_scoring_of_each_sequence():
    cfg = T.ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, max_seq_len=24)
    params = T.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    # 22 tokens: room for continuations of up to 3 tokens (the last one is not read), so its 4-token one is NaN;
    # 24: only the 1-token one (no branch tokens to append)
    prefixes = [list(rng.integers(4, 40, n)) for n in (3, 9, 17, 21, 5, 22, 24)]
    candidates = [[30, 31], [32, 33, 31], [34, 35, 35, 31], [36]]
    # 2 prompts a call padded to 4 rows, on a data x fsdp x tensor mesh: the branches follow their prompt's row
    got = sampler.score_continuations(cfg, params, prefixes, candidates, prompts_per_call=2,
                                      mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    # Direct: each whole sequence alone in a row of the model's full length (one compiled shape; the causal model
    # does not look at the padding after it), its candidate's log-probs summed.
    score = jax.jit(lambda batch, targets: -target_nll(batch_logits(cfg, params, batch), targets))
    for n, prefix in enumerate(prefixes):
        for v, cand in enumerate(candidates):
            row = prefix + cand
            if len(row) - 1 > cfg.max_seq_len:
                assert np.isnan(got[n, v]), (n, v)
                continue
            tokens, targets = np.zeros((1, cfg.max_seq_len), np.int32), np.zeros((1, cfg.max_seq_len), np.int32)
            tokens[0, :len(row) - 1], targets[0, :len(row) - 1] = row[:-1], row[1:]
            batch = {"tokens_BxL": tokens, "positions_BxL": np.arange(cfg.max_seq_len, dtype=np.int32)[None],
                     "segment_ids_BxL": (np.arange(cfg.max_seq_len) < len(row) - 1).astype(np.int32)[None]}
            logp = np.asarray(score(batch, targets))[0]
            assert got[n, v] == pytest.approx(logp[len(row) - 1 - len(cand):len(row) - 1].sum(), abs=1e-4), (n, v)
    assert np.isnan(got[5, 2]) and np.isfinite(got[5, [0, 1, 3]]).all()
    assert np.isnan(got[6, :3]).all() and np.isfinite(got[6, 3])
    with pytest.raises(ValueError, match="continuation 1 holds a token id"):
        sampler.score_continuations(cfg, params, prefixes, [[3], [40]])


@pytest.mark.parametrize("key, value, message", [
    ("expected_q_values", (0, 50, 50), "foresight.expected_q_values"),
    ("expected_q_values", (0, 101), "foresight.expected_q_values"),
    ("expected_q_values", (), "foresight.expected_q_values"),
    ("expected_q_rows", 0, "foresight.expected_q_rows"),
])
def test_expected_q_config_is_checked(key, value, message):
    from fwm.configlib import ConfigError
    from fwm.eval.config import default_eval_config, validate_eval_config
    config = default_eval_config()
    config.update(dict(checkpoint="/c", data_dir="/d"))
    validate_eval_config(config)
    config.foresight[key] = value
    with pytest.raises(ConfigError, match=message):
        validate_eval_config(config)
    config = default_eval_config()
    config.update(dict(checkpoint="/c", data_dir="/d"))
    config.sampling.update(dict(greedy=False, k=2))
    config.foresight.expected_q = True
    validate_eval_config(config)  # E[q] without greedy episodes: the sampled episodes' last steps are scored

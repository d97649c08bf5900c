"""Step samples -> rl_step arrays: the layout by hand, and the labels aligned with the model's log-probs."""
import jax
import numpy as np
import pytest

from fwm.mesh import place_batch
from fwm.model import transformer as T
from fwm.rl.batch import StepSample, first_fit_rows, rl_batch
from fwm.rl.step import make_token_logprobs
from mesh_checks import one_device_mesh

SAMPLE = StepSample(prompt_ids=[1, 5, 6], response_ids=[7, 8, 2], response_span_ids=[1, 2, 2],
                    response_logprobs=[-0.1, -0.2, -0.3], world_model_advantage=0.5, policy_advantage=-1.0)


def test_layout_by_hand():
    batch = rl_batch([SAMPLE], rows=2, seq_len=8, pad_id=0)
    np.testing.assert_array_equal(batch["tokens_BxL"][0], [1, 5, 6, 7, 8, 2, 0, 0])
    np.testing.assert_array_equal(batch["targets_BxL"][0], [5, 6, 7, 8, 2, 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids_BxL"][0], [1, 1, 1, 1, 1, 1, 0, 0])
    # Position 2 reads the last prompt token and predicts the first response token.
    np.testing.assert_array_equal(batch["loss_weights_BxL"][0], [0, 0, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(batch["span_ids_BxL"][0], [0, 0, 1, 2, 2, 0, 0, 0])
    np.testing.assert_allclose(batch["old_logprobs_BxL"][0], [0, 0, -0.1, -0.2, -0.3, 0, 0, 0])
    np.testing.assert_allclose(batch["advantages_BxL"][0], [0, 0, 0.5, -1, -1, 0, 0, 0])
    for key, value in batch.items():
        assert value.shape == (2, 8), key
        if key != "positions_BxL":
            assert not value[1].any(), key  # the second row is all padding


def test_packed_layout_by_hand():
    """Two samples share a row as segments 1 and 2, positions restarting at 0; the first segment's last
    token predicts nothing (its target is not the next segment's first token)."""
    other = StepSample(prompt_ids=[1, 9], response_ids=[4, 2], response_span_ids=[2, 2],
                       response_logprobs=[-0.4, -0.5], world_model_advantage=0.0, policy_advantage=2.0)
    batch = rl_batch([SAMPLE, other], rows=1, seq_len=12, pack=True)
    np.testing.assert_array_equal(batch["tokens_BxL"][0], [1, 5, 6, 7, 8, 2, 1, 9, 4, 2, 0, 0])
    np.testing.assert_array_equal(batch["targets_BxL"][0], [5, 6, 7, 8, 2, 0, 9, 4, 2, 0, 0, 0])
    np.testing.assert_array_equal(batch["segment_ids_BxL"][0], [1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0])
    np.testing.assert_array_equal(batch["positions_BxL"][0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(batch["loss_weights_BxL"][0], [0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(batch["old_logprobs_BxL"][0], [0, 0, -0.1, -0.2, -0.3, 0, 0, -0.4, -0.5, 0, 0, 0])
    np.testing.assert_allclose(batch["advantages_BxL"][0], [0, 0, 0.5, -1, -1, 0, 0, 2, 2, 0, 0, 0])
    # longest first (7, 6, 5, 4, 3), each into the first row with room: 7+3, 6+4, 5
    assert first_fit_rows([6, 4, 7, 3, 5], 10) == [[2, 3], [0, 1], [4]]
    with pytest.raises(ValueError, match=r"do not fit in 1 rows of 8 tokens \(packed into 2\)"):
        rl_batch([SAMPLE, SAMPLE], rows=1, seq_len=8, pack=True)


def test_errors_name_the_sample():
    with pytest.raises(ValueError, match="exceed seq_len=5"):
        rl_batch([SAMPLE], rows=1, seq_len=5)
    with pytest.raises(ValueError, match="do not fit in 1 rows"):
        rl_batch([SAMPLE, SAMPLE], rows=1, seq_len=8)
    bad = StepSample([1], [7, 8], [1], [-0.1, -0.2], 0.0, 0.0)
    with pytest.raises(ValueError, match="step sample 0: 2 response ids, 1 span ids"):
        rl_batch([bad], rows=1, seq_len=8)


def test_old_logprobs_sit_where_the_model_scores_the_same_tokens():
    """Log-probs taken from a forward over each sample alone land exactly where token_logprobs of the
    padded batch scores those tokens: the ratio of an unchanged policy is 1 (no off-by-one)."""
    model = T.ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                          mlp_dim=32, max_seq_len=32)
    params = T.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    samples = []
    for num_prompt, num_response in ((3, 4), (5, 2), (1, 6)):
        sequence = rng.integers(1, model.vocab_size, num_prompt + num_response)
        logits = np.asarray(T.forward(model, params, sequence[None]))[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        response_logp = [logp[num_prompt - 1 + j, sequence[num_prompt + j]] for j in range(num_response)]
        samples.append(StepSample(sequence[:num_prompt], sequence[num_prompt:], [2] * num_response, response_logp,
                                  0.0, 1.0))
    mesh = one_device_mesh()
    for batch in (rl_batch(samples, rows=4, seq_len=12), rl_batch(samples, rows=2, seq_len=16, pack=True)):
        scored = np.asarray(make_token_logprobs(model, mesh)(params, place_batch(mesh, batch)))
        trained = batch["loss_weights_BxL"] > 0
        assert trained.sum() == 12
        # packed: a segment attends only to itself, so each token is scored as in a row of its own
        np.testing.assert_allclose(scored[trained], batch["old_logprobs_BxL"][trained], rtol=1e-5, atol=1e-5)
    assert batch["segment_ids_BxL"].max() == 2  # the packed batch really shares a row

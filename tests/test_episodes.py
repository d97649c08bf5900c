"""The batched episode runner: with a scripted policy it reproduces fwm.trajectories.collect's trajectories;
span ids come from the decode offsets of the sampled ids; malformed model output is a scored step."""
import numpy as np
import pytest

from fwm import schema
from fwm.envs.retrievers import BM25Retriever
from fwm.envs.synthetic.knowledge import KnowledgeWorldConfig, generate_knowledge_world
from fwm.rollout import episodes
from fwm.rollout.envs import EnvPool
from fwm.rollout.sampler import Sample
from fwm.tokenizer import load_tokenizer, train_sentencepiece
from fwm.trajectories import collect
from fwm.trajectories.policies import KnowledgeMoves, make_policy


@pytest.fixture(scope="module")
def world_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("episodes")
    world = generate_knowledge_world(KnowledgeWorldConfig(num_people=12, num_cities=5, num_countries=2,
                                                          num_companies=4, num_universities=3,
                                                          num_train_questions=10, num_test_questions=12), seed=0)
    BM25Retriever.build(world.corpus(), str(root / "bm25"))
    texts = [doc.contents for doc in world.documents] + [task.question for task in world.test_tasks]
    texts += ["<think>I will search for x.</think><action><search>x</search></action>"
              "<information>Doc 1(Title: y) z</information><answer>w</answer><confidence>50</confidence>"] * 20
    train_sentencepiece(texts, str(root / "tok.model"), 400)
    spec = collect.EnvSpec("search", max_turns=6, index_dir=str(root / "bm25"))
    return world, spec, load_tokenizer(str(root / "tok.model"))


def test_scripted_policy_reproduces_collect(world_setup):
    world, spec, tokenizer = world_setup
    moves = KnowledgeMoves.from_world(world)
    behaviour = make_policy("noisy", moves, p_error=0.4, p_recover=0.6)
    tasks = list(world.test_tasks[:8])
    job = collect.CollectJob(spec, {"noisy": behaviour}, seed=3)
    items = collect.episode_items("eval", tasks, ["noisy"], 2)
    expected = collect.collect(job, items, workers=0, progress=False)

    slots = [episodes.EpisodeSlot(item.task, item.episode,
                                  collect.derive_seed(3, "collect", "eval", "noisy", item.task.id, item.episode))
             for item in items]
    with EnvPool(spec, threads=4) as pool:
        run = episodes.run_episodes(slots, episodes.ScriptedPolicy(behaviour, tokenizer), pool, tokenizer,
                                    episodes.PromptOptions(variant=schema.PLAIN, budget_tokens=300))
    rows = [episode.trajectory_row("eval", "noisy") for episode in run]
    assert len(rows) == 16 and rows == expected
    assert {row["reason"] for row in rows} >= {"answer"} and len({row["score"] for row in rows}) == 2
    for episode in run:  # every scripted step is well-formed, its spans cover think + action, EOS included
        assert episode.format_adherence == 1.0
        for step in episode.steps:
            assert step.response_ids[-1] == tokenizer.eos_id and step.q is None and step.logprobs is None
            assert set(step.span_ids) == {schema.SPAN_POLICY}
            assert step.prompt_ids[0] == tokenizer.bos_id
            assert tokenizer.decode(step.prompt_ids).startswith(schema.DEFAULT_INSTRUCTION)


def test_span_ids_come_from_decode_offsets(world_setup):
    _, _, tokenizer = world_setup
    text = ("<imaginary>find [person B] ünïcödé</imaginary><keyword>a; b</keyword><analysis>x</analysis>"
            "<confidence>40</confidence><think>t</think><action><search>q</search></action>")
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    decoded, spans = episodes.response_span_ids(tokenizer, ids)
    assert decoded == text
    first_policy = spans.index(schema.SPAN_POLICY)
    assert set(spans[:first_policy]) == {schema.SPAN_WM} and set(spans[first_policy:]) == {schema.SPAN_POLICY}
    assert tokenizer.decode(ids[:first_policy]) == text[:text.index("<think>")]
    _, offsets = episodes.token_offsets(tokenizer, ids)
    assert all(a[1] <= b[0] or a == b for a, b in zip(offsets, offsets[1:]))  # tiles, non-decreasing
    assert offsets[-1][1] == len(text)


class _CannedPolicy:
    """Replays fixed response texts (as a model would emit them), one per call, for every request."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.texts, self.calls = tokenizer, list(texts), 0

    def __call__(self, requests):
        text = self.texts[min(self.calls, len(self.texts) - 1)]
        self.calls += 1
        ids = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        return [Sample(ids, [-0.5] * len(ids), [-0.5] * len(ids), True) for _ in requests]


def test_malformed_output_is_a_scored_step_and_history_shows_it(world_setup):
    world, spec, tokenizer = world_setup
    task = world.test_tasks[0]
    texts = ["garbage <think> no action", "<think>x</think><action><search>" + task.metadata["hops"][0]["subject"]
             + "</search></action>", "<confidence>99</confidence><think>y</think><action><answer>nobody</answer></action>"]
    slots = episodes.episode_slots([task], 2, seed=0)
    with EnvPool(spec) as pool:
        run = episodes.run_episodes(slots, _CannedPolicy(tokenizer, texts), pool, tokenizer,
                                    episodes.PromptOptions(budget_tokens=4000))
        capped = episodes.run_episodes(slots, _CannedPolicy(tokenizer, texts), pool, tokenizer,
                                       episodes.PromptOptions(budget_tokens=4000, max_prompt_tokens=120))
    for episode in run:
        first, second, third = episode.steps
        assert first.action is None and not first.format_ok and "missing <action>" in first.malformed
        assert episode.record.num_malformed == 1 and second.action.kind == "search"
        assert "malformed" in first.observation
        assert third.q == 0.99 and third.action == schema.Action("answer", "nobody")
        assert episode.record.reason == "answer" and episode.record.score == 0.0 and not episode.success
        assert episode.format_adherence == 0.0  # plain / partial responses in the full variant
        shown = tokenizer.decode(third.prompt_ids)
        assert "Step 1:\ngarbage &lt;think> no action\n<information>Your previous response was malformed" in shown
        assert "Step 2:\n<action><search>" in shown and not any(step.prompt_truncated for step in episode.steps)
        assert len(third.logprobs) == len(third.response_ids) == len(third.span_ids)
    for episode, uncapped in zip(capped, run):  # the cap cuts from the left after BOS, as sft_example does
        for step, full in zip(episode.steps, uncapped.steps):
            assert step.prompt_truncated and len(step.prompt_ids) == 120
            assert step.prompt_ids == [tokenizer.bos_id] + full.prompt_ids[-119:]


def test_math_env_pool_matches_collect_with_answers_checked_in_a_child_process(world_setup, tmp_path):
    from fwm.envs.synthetic.arithmetic import ArithmeticConfig, generate_arithmetic_tasks
    from fwm.trajectories.policies import ArithmeticMoves

    _, _, tokenizer = world_setup
    _, test = generate_arithmetic_tasks(ArithmeticConfig(num_train_tasks=4, num_test_tasks=3), 0)
    spec = collect.EnvSpec("python", max_turns=6, timeout_s=5.0)
    behaviour = make_policy("noisy", ArithmeticMoves(), p_error=0.5, p_recover=0.5)
    items = collect.episode_items("eval", list(test), ["noisy"], 2)
    expected = collect.collect(collect.CollectJob(spec, {"noisy": behaviour}, seed=1), items, progress=False)
    slots = [episodes.EpisodeSlot(i.task, i.episode, collect.derive_seed(1, "collect", "eval", "noisy", i.task.id,
                                                                          i.episode)) for i in items]
    with EnvPool(spec, threads=4) as pool:
        run = episodes.run_episodes(slots, episodes.ScriptedPolicy(behaviour, tokenizer), pool, tokenizer,
                                    episodes.PromptOptions(variant=schema.PLAIN))
    assert [e.trajectory_row("eval", "noisy") for e in run] == expected
    assert any(row["score"] == 1.0 for row in expected) and any(row["reason"] == "answer" and row["score"] == 0.0
                                                                 for row in expected)

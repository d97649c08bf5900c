"""Stage corpora: record formats, which tokens each variant trains (real SentencePiece tokenizer through
fwm.data.features), the plain/WM-AMT difference being only the blocks, SFT variants on the same steps,
determinism for a seed."""
import dataclasses
import json
import os

import numpy as np
import pytest

from fwm import schema
from fwm.data import features, records
from fwm.envs.retrievers import BM25Retriever
from fwm.envs.synthetic import KnowledgeWorldConfig, generate_knowledge_world
from fwm.tokenizer import train_sentencepiece
from fwm.trajectories import blocks, collect, corpora, evidence
from fwm.trajectories.policies import KnowledgeMoves, make_policy

SMALL = KnowledgeWorldConfig(num_people=12, num_cities=5, num_countries=2, num_companies=4, num_universities=3,
                             num_train_questions=60, num_test_questions=5)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """Noisy trajectories (30 mid-training tasks, 12 SFT tasks) with rule blocks, as the pipeline makes them."""
    world = generate_knowledge_world(SMALL, seed=8)
    index = tmp_path_factory.mktemp("index") / "bm25"
    BM25Retriever.build(world.corpus(), index)
    spec = collect.EnvSpec("search", max_turns=8, index_dir=str(index))
    policies = {"noisy": make_policy("noisy", KnowledgeMoves.from_world(world))}
    job = collect.CollectJob(spec, policies, seed=0)
    mid = collect.collect(job, collect.episode_items("mid_train", world.train_tasks[12:42], ("noisy",), 1),
                          progress=False)
    sft_all = collect.collect(job, collect.episode_items("sft", world.train_tasks[:12], ("noisy",), 2), progress=False)
    sft = corpora.select_sft_trajectories(sft_all, ("noisy",))
    items = [blocks.BlockItem(row, corpora.wm_steps(row["id"], len(row["actions"]), 0.5, 0)) for row in mid]
    items += [blocks.BlockItem(row, tuple(range(len(row["actions"])))) for row in sft]
    block_job = blocks.BlockJob(spec, policies, "rule", {}, seed=0, mc_k=2,
                                entity_names=tuple(e.name for e in world.entities))
    rows = [r for done in blocks.annotate_chunk(block_job, [i for i in items if i.steps]) for r in done.rows]
    block_map = {(r["trajectory_id"], r["step"]): blocks.block_from_dict(r["block"]) for r in rows}
    return mid, sft_all, sft, block_map


def _build(directory, material, seed=0, eval_fraction=0.2):
    mid, _, sft, block_map = material
    options = corpora.CorpusOptions(seed=seed, eval_fraction=eval_fraction, sft_max_tokens=300)
    return corpora.build_corpora(str(directory), mid, sft, block_map, options)


def _read(directory, name):
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def built(material, tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpora")
    return str(directory), _build(directory, material)


@pytest.fixture(scope="module")
def tokenizer(built, tmp_path_factory):
    directory, _ = built
    texts = [seg["text"] for r in _read(directory, "mid_train_wm") for seg in r["segments"]]
    texts += [r["prompt"] + r["response"] for r in _read(directory, "sft_full")]
    return train_sentencepiece(texts, str(tmp_path_factory.mktemp("tok") / "t.model"), 512)


def _trained(example):
    return example["targets"][example["loss_weights"] > 0]


def test_sft_uses_fewer_steps_of_successful_trajectories_only(material, built):
    mid, sft_all, sft, _ = material
    _, summary = built
    assert all(row["score"] == 1.0 for row in sft) and len({row["task"]["id"] for row in sft}) == len(sft)
    assert len(sft) == len({r["task"]["id"] for r in sft_all if r["score"] == 1.0})
    assert summary["sft_steps"] < summary["mid_train_steps"] / 2
    assert summary["skipped_trajectories"] == {"mid_train": 0, "sft_malformed": 0, "sft_missing_block": 0}


def test_every_record_validates_and_the_manifest_says_how_to_train_it(built):
    directory, summary = built
    manifest = json.load(open(os.path.join(directory, "manifest.json")))
    assert manifest == summary
    for name, entry in summary["corpora"].items():
        rows = _read(directory, name)
        assert len(rows) == entry["records"] > 0
        validate = records.VALIDATORS[entry["stage"]]
        for row in rows:
            validate(row)
        if entry["stage"] == "sft":
            assert {row["variant"] for row in rows} == {entry["variant"]}
    assert summary["corpora"]["iwm"]["trained_roles"] == ["observation"]
    assert summary["corpora"]["mid_train_plain"]["trained_roles"] == list(features.DEFAULT_TRAINED_ROLES)
    for name, entry in summary["corpora"].items():  # every LM record says what it trains, as its manifest entry
        if entry["stage"] == "lm":
            assert all(row["trained_roles"] == entry["trained_roles"] for row in _read(directory, name)), name


def test_plain_mid_training_trains_actions_never_observations(built, tokenizer):
    directory, _ = built
    tags = tokenizer.tag_ids
    seen = set()
    for row in _read(directory, "mid_train_plain"):
        trained = set(_trained(features.lm_example(records.validate_lm(row), tokenizer)).tolist())
        assert tags["<information>"] not in trained and tags["</information>"] not in trained
        assert tags["<imaginary>"] not in trained
        seen |= trained
    assert {tags["<think>"], tags["<action>"], tags["<search>"], tags["<answer>"]} <= seen


def test_wm_amt_is_plain_plus_blocks_and_trains_the_blocks(built, tokenizer):
    directory, summary = built
    plain, wm = _read(directory, "mid_train_plain"), _read(directory, "mid_train_wm")
    assert [r["id"] for r in plain] == [r["id"] for r in wm]
    inserted = 0
    for p, w in zip(plain, wm):
        assert [s for s in w["segments"] if s["role"] != "world_model"] == p["segments"]
        blocks_here = [s for s in w["segments"] if s["role"] == "world_model"]
        inserted += len(blocks_here)
        for i, segment in enumerate(w["segments"]):
            if segment["role"] == "world_model":  # a block always precedes the step's policy span
                assert w["segments"][i + 1]["role"] == "policy"
        if blocks_here:
            trained = set(_trained(features.lm_example(records.validate_lm(w), tokenizer)).tolist())
            assert {tokenizer.tag_ids["<imaginary>"], tokenizer.tag_ids["<confidence>"]} <= trained
            assert tokenizer.tag_ids["<information>"] not in trained
    steps = sum(1 for r in plain for s in r["segments"] if s["role"] == "action")
    assert 0.3 * steps < inserted < 0.7 * steps  # share 0.5
    assert summary["corpora"]["mid_train_wm"]["trained_tokens"] > summary["corpora"]["mid_train_plain"]["trained_tokens"]


def test_iwm_trains_exactly_the_next_observation(built, tokenizer):
    directory, _ = built
    rows = _read(directory, "iwm")
    for row in rows:
        roles = [s["role"] for s in row["segments"]]
        assert roles == ["prompt", "policy", "action", "observation"]  # state s_t, think, a_t, o_t
        assert row["trained_roles"] == ["observation"]
        example = features.lm_example(records.validate_lm(row), tokenizer, trained_roles=row["trained_roles"])
        assert tokenizer.decode(_trained(example).tolist()) == row["segments"][-1]["text"]
        assert tokenizer.tag_ids["<action>"] not in _trained(example)
    # the prompt holds the whole earlier trajectory: a step's prompt extends the previous step's
    pairs = [(a, b) for a, b in zip(rows, rows[1:]) if a["id"].rsplit("/", 1)[0] == b["id"].rsplit("/", 1)[0]]
    assert pairs
    for first, second in pairs:
        earlier = "".join(segment["text"] for segment in first["segments"])
        assert second["segments"][0]["text"].startswith(earlier)
        assert "<think>" not in second["segments"][0]["text"][len(earlier):]  # no step between the two


def test_sft_variants_hold_the_same_steps_with_their_spans(built, tokenizer):
    directory, _ = built
    by_variant = {v: _read(directory, f"sft_{v}") for v in schema.VARIANTS}
    ids = [[r["id"].rsplit("/", 1)[0] for r in rows] for rows in by_variant.values()]
    assert ids[0] == ids[1] == ids[2] and ids[0]
    tags = tokenizer.tag_ids
    for variant, rows in by_variant.items():
        for row in rows:
            parsed = schema.parse_response(row["response"])
            assert schema.format_ok(parsed, variant), parsed.malformed
            assert row["prompt"].endswith(f"Step {int(row['id'].split('/')[-2]) + 1}:\n")
            example = features.sft_example(records.validate_sft(row), tokenizer, seq_len=8192)
            trained = _trained(example)
            assert tokenizer.decode(trained.tolist()) == row["response"]
            span_ids = set(example["span_ids"][example["loss_weights"] > 0].tolist())
            assert (schema.SPAN_WM in span_ids) == (variant != schema.PLAIN)
            assert (tags["<confidence>"] in trained) == (variant == schema.FULL)
    count, name = corpora.make_token_counter(tokenizer.path)
    assert name.startswith("tokens of") and count(rows[0]["prompt"]) == len(tokenizer.encode(rows[0]["prompt"]))
    # the history in the prompt is cut to the budget (300 whitespace words here, BOS + prompt + response +
    # EOS), never the question
    cut = [r for r in by_variant["full"] if "oldest omitted" in r["prompt"]]
    assert cut and all("Question:" in r["prompt"] and len(r["prompt"].split()) + len(r["response"].split()) + 2 <= 300
                       for r in cut)


def test_sft_samples_fit_the_token_budget_and_cuts_are_counted(material, tokenizer, tmp_path):
    """With the tokenizer the trainer uses, every sample's BOS + prompt + response + EOS fits sft_max_tokens (so
    sft_example cuts nothing from the question); samples whose history had to go are counted, and so are samples
    that cannot fit even without history."""
    mid, _, sft, block_map = material
    options = corpora.CorpusOptions(eval_fraction=0.0, sft_max_tokens=900, tokenizer_path=tokenizer.path)
    summary = corpora.build_corpora(str(tmp_path), mid[:2], sft, block_map, options)
    rows = _read(tmp_path, "sft_full")
    lengths = [len(tokenizer.encode(r["prompt"])) + len(tokenizer.encode(r["response"])) + 2 for r in rows]
    cut = sum("oldest omitted" in r["prompt"] for r in rows)
    entry = summary["corpora"]["sft_full"]
    assert 0 < cut < len(rows) and entry["history_cut"] == cut and entry["over_max_tokens"] == 0
    assert max(lengths) <= 900 and entry["tokens"] == sum(lengths)
    tight = corpora.build_corpora(str(tmp_path / "tight"), mid[:2], sft, block_map,
                                  dataclasses.replace(options, sft_max_tokens=450))
    assert tight["corpora"]["sft_full"]["over_max_tokens"] > 0  # instruction and question alone take ~370 tokens
    assert tight["tokenizer"] == os.path.relpath(tokenizer.path, str(tmp_path / "tight"))


def test_corpora_are_deterministic_for_a_seed(material, built, tmp_path):
    directory, summary = built
    again = _build(tmp_path / "again", material)
    assert again["corpora"].keys() == summary["corpora"].keys()
    for name in summary["corpora"]:
        assert _read(tmp_path / "again", name) == _read(directory, name)
        eval_path = os.path.join(directory, f"{name}_eval.jsonl")
        if os.path.exists(eval_path):  # held-out trajectories appear in no training file
            held_out = {json.loads(line)["id"] for line in open(eval_path)}
            assert not held_out & {r["id"] for r in _read(directory, name)}
    other = _build(tmp_path / "other", material, seed=1)
    assert other["corpora"]["mid_train_plain"]["records"] != summary["corpora"]["mid_train_plain"]["records"] or \
        _read(tmp_path / "other", "mid_train_plain") != _read(directory, "mid_train_plain")


def test_selection_helpers(material):
    mid, *_ = material
    assert corpora.wm_steps("a", 50, 0.0, 0) == () and corpora.wm_steps("a", 5, 1.0, 0) == (0, 1, 2, 3, 4)
    assert corpora.wm_steps("a", 50, 0.5, 0) == corpora.wm_steps("a", 50, 0.5, 0) != corpora.wm_steps("a", 50, 0.5, 1)
    malformed = dict(mid[0], id="bad", actions=[None] + mid[0]["actions"][1:])
    assert not corpora.renderable(malformed) and corpora.renderable(mid[0])
    assert corpora.think_text(schema.Action("search", "X")) == "I will search for X."
    assert np.isclose(np.mean([corpora.is_eval(f"t{i}", 0.25, 0) for i in range(2000)]), 0.25, atol=0.03)


def test_malformed_trajectories_are_skipped_and_counted(material, tmp_path):
    mid, _, sft, block_map = material
    malformed = dict(mid[0], id="bad", actions=[None] + mid[0]["actions"][1:])
    summary = corpora.build_corpora(str(tmp_path), [malformed] + list(mid), sft, block_map,
                                    corpora.CorpusOptions(eval_fraction=0.0))
    assert summary["skipped_trajectories"]["mid_train"] == 1
    assert summary["corpora"]["mid_train_plain"]["records"] == len(mid)



def test_pretraining_corpus_states_every_fact_in_several_phrasings():
    assert corpora.fact_phrasings("Ava Lin", "mentored_by", "Bo Reyes") == (
        "Ava Lin was mentored by Bo Reyes.", "The mentor of Ava Lin is Bo Reyes.", "Bo Reyes is the mentor of Ava Lin.",
        "Who is the mentor of Ava Lin? Bo Reyes.")
    assert corpora.fact_phrasings("Orbix Labs", "headquartered_in", "Velmora")[3] == \
        "What is the city where Orbix Labs is headquartered? Velmora."
    world = generate_knowledge_world(SMALL, seed=8)
    documents = [{"id": doc.id, "text": doc.contents} for doc in world.documents]
    facts = [(e.name, relation, world.entity(o).name) for e in world.entities for relation, o in e.relations]
    built = corpora.pretrain_records(documents, facts, 5, seed=0)
    assert built == corpora.pretrain_records(documents, facts, 5, seed=0)
    assert len(built) == 5 * len(documents) and [r["text"] for r in built[::5]] == [d["text"] for d in documents]
    text = "\n".join(r["text"] for r in built)
    for fact in facts:  # each fact in at least three of the four phrasings (subject's and object's paraphrases)
        assert sum(phrasing in text for phrasing in corpora.fact_phrasings(*fact)) >= 3, fact
    assert all(r["trained_roles"] == list(features.DEFAULT_TRAINED_ROLES) for r in built)
    for record in built:
        records.validate_lm(record)
    assert len(text.split()) > 5 * sum(len(d["text"].split()) for d in documents) / 2


def test_evidence_think_quotes_the_sentence_the_argument_was_read_from():
    first = ("Doc 1(Title: Dugegi) Dugegi exports mostly to Saroara. The mayor of Dugegi is Vuduno Lafu.\n"
             "Doc 2(Title: Kafila) Kafila lies on the coast.")
    second = "Doc 1(Title: Saroara) The largest city of Saroara is Duvilu. Saroara was founded by Vipi Raze."
    search, answer = schema.Action("search", "Saroara"), schema.Action("answer", "Duvilu")
    assert evidence.evidence_sentence("Saroara", [first]) == "Dugegi exports mostly to Saroara."
    assert evidence.evidence_sentence("Vuduno Lafu", [first]) == "The mayor of Dugegi is Vuduno Lafu."
    # the latest observation naming it wins; its first sentence naming it
    assert evidence.evidence_sentence("Saroara", [first, second]) == "The largest city of Saroara is Duvilu."
    assert corpora.think_text(search, [first], "evidence") == \
        "Dugegi exports mostly to Saroara. I will search for Saroara."
    assert corpora.think_text(answer, [first, second], "evidence") == \
        "The largest city of Saroara is Duvilu. My answer is Duvilu."
    # nothing read names it (a first search, a guess): the action's sentence alone; word boundaries hold
    assert corpora.think_text(schema.Action("search", "Dugegi"), [], "evidence") == "I will search for Dugegi."
    assert corpora.think_text(schema.Action("answer", "Saro"), [first], "evidence") == "My answer is Saro."
    assert corpora.think_text(search, [first], "action") == "I will search for Saroara."
    assert evidence.evidence_sentence("X", ["Doc 1(Title: X) X is " + "very " * 80 + "long."]) is None
    with pytest.raises(ValueError, match="think style"):
        corpora.think_text(search, [first], "quote")


def test_evidence_think_reaches_every_corpus(material, tmp_path):
    mid, _, sft, block_map = material
    corpora.build_corpora(str(tmp_path), mid, sft, block_map, corpora.CorpusOptions(eval_fraction=0.0, think="evidence"))
    quoted = [r for r in _read(tmp_path, "sft_plain") if "I will search for" in r["response"]
              and not r["response"].startswith("<think>I will search for")]
    assert quoted, "no SFT step quoted its evidence"
    for record in quoted:  # the quoted sentence is in the prompt's history, so it can be copied
        sentence = record["response"][len("<think>"):record["response"].index(" I will search for")]
        assert sentence in record["prompt"]
    plain = _read(tmp_path, "mid_train_plain")
    assert any(". My answer is" in seg["text"] or ". I will search for" in seg["text"]
               for r in plain for seg in r["segments"] if seg["role"] == "policy")

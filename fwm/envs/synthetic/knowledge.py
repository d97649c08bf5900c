"""A synthetic knowledge world: invented, typed entities with functional relations, one corpus document
per entity, and 1-4 hop questions whose gold hops an oracle can follow by searching entity names.

`generate_knowledge_world(config, seed)` is a pure function of its arguments. Every (entity, relation)
has exactly one object, so each question has exactly one answer. Each entity's document (Search-R1
form: its name on the first line) states all of its own relations in prose, so hop i of a question is
answered by the document of hop i's subject; documents also mention a few entities that point at
them ("incoming" mentions) and some filler sentences, which make search results noisier.

Difficulty knobs: the distribution of hop counts (`hop_weights`, `test_hop_weights`), the world size
(more entities of a type = more candidates), `name_overlap` (people sharing a first or family name, so
a name search returns near-duplicates), `incoming_mentions` and `filler_sentences`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random
from typing import Any, Sequence

from fwm.envs.base import Task, write_tasks
from fwm.envs.jsonl import write_json, write_jsonl
from fwm.envs.retrievers import Doc

ENTITY_TYPES = ("person", "city", "country", "company", "university")


@dataclasses.dataclass(frozen=True)
class Relation:
    """A functional relation: every `subject_type` entity has one `object_type` object.

    sentence: how documents state it; phrase: the noun phrase naming the object given the subject,
    nested to build multi-hop questions ("the founder of the company that X works for").
    """

    name: str
    subject_type: str
    object_type: str
    sentence: str
    phrase: str


RELATIONS = (
    Relation("born_in", "person", "city", "{s} was born in {o}.", "the city where {s} was born"),
    Relation("works_for", "person", "company", "{s} works for {o}.", "the company that {s} works for"),
    Relation("studied_at", "person", "university", "{s} studied at {o}.", "the university where {s} studied"),
    Relation("mentored_by", "person", "person", "{s} was mentored by {o}.", "the mentor of {s}"),
    Relation("located_in", "city", "country", "{s} is located in {o}.", "the country where {s} is located"),
    Relation("capital", "country", "city", "The capital of {s} is {o}.", "the capital of {s}"),
    Relation("founded_by", "company", "person", "{s} was founded by {o}.", "the founder of {s}"),
    Relation("headquartered_in", "company", "city", "{s} is headquartered in {o}.",
             "the city where {s} is headquartered"),
    Relation("based_in", "university", "city", "{s} is based in {o}.", "the city where {s} is based"),
    Relation("led_by", "university", "person", "{s} is led by {o}.", "the head of {s}"),
)
RELATION_BY_NAME = {relation.name: relation for relation in RELATIONS}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "th", "sh", "st", "pl", "vr", "zh", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "x", "k", "th")
_COMPANY_SUFFIXES = ("Labs", "Works", "Systems", "Industries", "Group", "Dynamics")
_UNIVERSITY_SUFFIXES = ("University", "Institute", "College", "Academy")
_COUNTRY_SUFFIXES = ("ia", "land", "mark", "stan", "ara")
_PROFESSIONS = ("engineer", "painter", "chemist", "pilot", "architect", "teacher", "farmer", "lawyer", "writer",
                "surgeon")
_FILLERS = {
    "person": ("{n} enjoys long walks and {hobby}.", "{n} once won a local prize for {hobby}.",
               "Friends describe {n} as patient and curious."),
    "city": ("{n} has about {k} thousand residents.", "{n} is known for its {thing}.",
             "Visitors to {n} often mention the weather."),
    "country": ("{n} has a population of about {k} million.", "{n} is known for its {thing}.",
                "The national flag of {n} is green and white."),
    "company": ("{n} employs about {k} hundred people.", "{n} is known for its {thing}.",
                "{n} publishes an annual report every spring."),
    "university": ("{n} enrols about {k} thousand students.", "{n} is known for its {thing}.",
                   "{n} holds a graduation ceremony every summer."),
}
_HOBBIES = ("chess", "gardening", "sailing", "pottery", "astronomy", "cycling", "baking", "fencing")
_THINGS = ("old bridges", "markets", "libraries", "festivals", "gardens", "museums", "harbour", "towers")


@dataclasses.dataclass(frozen=True)
class KnowledgeWorldConfig:
    """Sizes and difficulty of a knowledge world; see the module docstring for the knobs."""

    num_people: int = 24
    num_cities: int = 8
    num_countries: int = 3
    num_companies: int = 6
    num_universities: int = 4
    num_train_questions: int = 200
    num_test_questions: int = 50
    hop_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # P(1 hop), ..., P(4 hops)
    test_hop_weights: tuple[float, ...] | None = None  # None: same as hop_weights
    name_overlap: float = 0.2
    incoming_mentions: int = 2
    filler_sentences: int = 1

    def __post_init__(self):
        counts = {"num_people": self.num_people, "num_cities": self.num_cities, "num_countries": self.num_countries,
                  "num_companies": self.num_companies, "num_universities": self.num_universities}
        for name, count in counts.items():
            if count < 1:
                raise ValueError(f"KnowledgeWorldConfig.{name} must be >= 1, got {count}")
        if self.num_people < 2:
            raise ValueError("KnowledgeWorldConfig.num_people must be >= 2 (mentors are other people)")
        if self.num_cities < self.num_countries:
            raise ValueError(f"KnowledgeWorldConfig.num_cities ({self.num_cities}) must be >= num_countries "
                             f"({self.num_countries}): every country needs a capital")
        for name in ("hop_weights", "test_hop_weights"):
            weights = getattr(self, name)
            if weights is None:
                continue
            if not 1 <= len(weights) <= 4 or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"KnowledgeWorldConfig.{name} must hold 1-4 non-negative weights (for 1, 2, ... "
                                 f"hops) with a positive sum, got {weights}")
        if not 0 <= self.name_overlap <= 1:
            raise ValueError(f"KnowledgeWorldConfig.name_overlap must be in [0, 1], got {self.name_overlap}")


@dataclasses.dataclass(frozen=True)
class Entity:
    id: str
    name: str
    type: str
    relations: tuple[tuple[str, str], ...]  # (relation name, object entity id), one per relation of the type

    def object_of(self, relation: str) -> str:
        return dict(self.relations)[relation]


@dataclasses.dataclass(frozen=True)
class WorldDocument:
    """The corpus document of one entity; `entity_ids` are every entity it names (itself first)."""

    id: str
    contents: str
    entity_ids: tuple[str, ...]

    @property
    def title(self) -> str:
        return self.contents.split("\n", 1)[0]


@dataclasses.dataclass(frozen=True)
class KnowledgeWorld:
    config: KnowledgeWorldConfig
    seed: int
    entities: tuple[Entity, ...]
    documents: tuple[WorldDocument, ...]
    train_tasks: tuple[Task, ...]
    test_tasks: tuple[Task, ...]

    @functools.cached_property
    def _entity_index(self) -> dict[str, Entity]:
        return {entity.id: entity for entity in self.entities}

    @functools.cached_property
    def _name_index(self) -> dict[str, Entity]:
        return {entity.name: entity for entity in self.entities}

    @functools.cached_property
    def _document_index(self) -> dict[str, WorldDocument]:
        return {document.id: document for document in self.documents}

    def entity(self, entity_id: str) -> Entity:
        return self._entity_index[entity_id]

    def entity_by_name(self, name: str) -> Entity:
        return self._name_index[name]

    def document(self, doc_id: str) -> WorldDocument:
        return self._document_index[doc_id]

    def document_entity_names(self, doc_id: str) -> tuple[str, ...]:
        """Names of the entities a document mentions (for spoiler checks on retrieved text)."""
        return tuple(self.entity(i).name for i in self.document(doc_id).entity_ids)

    def corpus(self) -> list[Doc]:
        """The documents as retriever input (Search-R1 form)."""
        return [Doc(id=document.id, contents=document.contents) for document in self.documents]


def generate_knowledge_world(config: KnowledgeWorldConfig, seed: int) -> KnowledgeWorld:
    """Builds entities, relations, documents and train/test questions; a pure function of (config, seed)."""
    rng = random.Random(f"knowledge-world-{seed}")
    entities = _make_entities(config, rng)
    documents = tuple(_make_document(entity, entities, config, rng) for entity in entities.values())
    seen: set[tuple[str, tuple[str, ...]]] = set()
    train = _make_questions(entities, config.num_train_questions, config.hop_weights, "train", seen, rng)
    test = _make_questions(entities, config.num_test_questions, config.test_hop_weights or config.hop_weights,
                           "test", seen, rng)
    return KnowledgeWorld(config=config, seed=seed, entities=tuple(entities.values()), documents=documents,
                          train_tasks=train, test_tasks=test)


def write_knowledge_world(world: KnowledgeWorld, directory: str | os.PathLike) -> dict[str, str]:
    """Writes world.jsonl (entities, relations, mentions), corpus.jsonl (Search-R1 form), train.jsonl,
    test.jsonl (tasks) and meta.json (config, seed, counts); returns the paths by name."""
    directory = os.fspath(directory)
    paths = {name: os.path.join(directory, name + ext) for name, ext in
             (("world", ".jsonl"), ("corpus", ".jsonl"), ("train", ".jsonl"), ("test", ".jsonl"), ("meta", ".json"))}
    mentions = {document.id: list(document.entity_ids) for document in world.documents}
    write_jsonl(paths["world"], ({"id": e.id, "name": e.name, "type": e.type, "relations": dict(e.relations),
                                  "mentions": mentions[e.id]} for e in world.entities))
    write_jsonl(paths["corpus"], ({"id": d.id, "contents": d.contents} for d in world.documents))
    write_tasks(paths["train"], world.train_tasks)
    write_tasks(paths["test"], world.test_tasks)
    write_json(paths["meta"], {"world": "knowledge", "seed": world.seed, "config": dataclasses.asdict(world.config),
                               "num_entities": len(world.entities), "num_documents": len(world.documents),
                               "num_train_tasks": len(world.train_tasks), "num_test_tasks": len(world.test_tasks)})
    return paths


def _word(rng: random.Random, syllables: int) -> str:
    """Consonant-vowel syllables with a consonant only at the end, so names stay pronounceable."""
    return ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
            + rng.choice(_CODAS)).capitalize()


def _make_entities(config: KnowledgeWorldConfig, rng: random.Random) -> dict[str, Entity]:
    used_words: set[str] = set()

    def fresh_word(syllables: int) -> str:
        while True:
            word = _word(rng, syllables)
            if word.lower() not in used_words and len(word) >= 4:
                used_words.add(word.lower())
                return word

    names: dict[str, list[str]] = {t: [] for t in ENTITY_TYPES}
    firsts: list[str] = []
    lasts: list[str] = []
    taken: set[str] = set()
    while len(names["person"]) < config.num_people:
        first = rng.choice(firsts) if firsts and rng.random() < config.name_overlap else fresh_word(2)
        last = rng.choice(lasts) if lasts and rng.random() < config.name_overlap else fresh_word(rng.choice((2, 3)))
        if f"{first} {last}" not in taken and first != last:
            firsts += [first] if first not in firsts else []  # reuse draws uniformly over distinct names
            lasts += [last] if last not in lasts else []
            taken.add(f"{first} {last}")
            names["person"].append(f"{first} {last}")
    names["city"] = [fresh_word(rng.choice((2, 3))) for _ in range(config.num_cities)]
    names["country"] = [fresh_word(2) + rng.choice(_COUNTRY_SUFFIXES) for _ in range(config.num_countries)]
    names["company"] = [f"{fresh_word(2)} {rng.choice(_COMPANY_SUFFIXES)}" for _ in range(config.num_companies)]
    names["university"] = [f"{fresh_word(2)} {rng.choice(_UNIVERSITY_SUFFIXES)}"
                           for _ in range(config.num_universities)]
    ids = {t: [f"{t}-{i}" for i in range(len(names[t]))] for t in ENTITY_TYPES}

    objects: dict[str, dict[str, str]] = {i: {} for t in ENTITY_TYPES for i in ids[t]}
    for i, city in enumerate(ids["city"]):  # every country gets at least one city, its capital among them
        objects[city]["located_in"] = ids["country"][i] if i < len(ids["country"]) else rng.choice(ids["country"])
    for country in ids["country"]:
        objects[country]["capital"] = rng.choice([c for c in ids["city"] if objects[c]["located_in"] == country])
    for company in ids["company"]:
        objects[company]["founded_by"] = rng.choice(ids["person"])
        objects[company]["headquartered_in"] = rng.choice(ids["city"])
    for university in ids["university"]:
        objects[university]["based_in"] = rng.choice(ids["city"])
        objects[university]["led_by"] = rng.choice(ids["person"])
    for person in ids["person"]:
        objects[person]["born_in"] = rng.choice(ids["city"])
        objects[person]["works_for"] = rng.choice(ids["company"])
        objects[person]["studied_at"] = rng.choice(ids["university"])
        objects[person]["mentored_by"] = rng.choice([p for p in ids["person"] if p != person])
    return {i: Entity(id=i, name=name, type=t,
                      relations=tuple((r.name, objects[i][r.name]) for r in RELATIONS if r.subject_type == t))
            for t in ENTITY_TYPES for i, name in zip(ids[t], names[t])}


def _make_document(entity: Entity, entities: dict[str, Entity], config: KnowledgeWorldConfig,
                   rng: random.Random) -> WorldDocument:
    n = entity.name
    kind = rng.choice(_PROFESSIONS) if entity.type == "person" else entity.type
    sentences = [f"{n} is a{'n' if kind[0] in 'aeio' else ''} {kind}."]
    mentioned = [entity.id]
    for relation_name, object_id in entity.relations:
        sentences.append(RELATION_BY_NAME[relation_name].sentence.format(s=n, o=entities[object_id].name))
        mentioned.append(object_id)
    incoming = [(other, relation_name) for other in entities.values() for relation_name, object_id in other.relations
                if object_id == entity.id]
    for other, relation_name in rng.sample(incoming, min(config.incoming_mentions, len(incoming))):
        sentences.append(RELATION_BY_NAME[relation_name].sentence.format(s=other.name, o=n))
        mentioned.append(other.id)
    fillers = _FILLERS[entity.type]
    for template in rng.sample(fillers, min(config.filler_sentences, len(fillers))):
        sentences.append(template.format(n=n, hobby=rng.choice(_HOBBIES), thing=rng.choice(_THINGS),
                                         k=rng.randint(2, 90)))
    unique_mentions = tuple(dict.fromkeys(mentioned))
    return WorldDocument(id=entity.id, contents=f"{n}\n" + " ".join(sentences), entity_ids=unique_mentions)


def _make_questions(entities: dict[str, Entity], count: int, hop_weights: Sequence[float], split: str,
                    seen: set[tuple[str, tuple[str, ...]]], rng: random.Random) -> tuple[Task, ...]:
    starts = list(entities.values())
    hop_counts = list(range(1, len(hop_weights) + 1))
    tasks: list[Task] = []
    attempts = 0
    while len(tasks) < count:
        attempts += 1
        if attempts > 200 * count + 1000:
            raise ValueError(f"could not make {count} distinct {split} questions from this world ({len(tasks)} "
                             f"made, {len(seen)} in all): enlarge the world or ask for fewer questions")
        hops = rng.choices(hop_counts, weights=hop_weights)[0]
        chain = [rng.choice(starts)]
        relations: list[str] = []
        for _ in range(hops):
            relation_name, object_id = rng.choice(chain[-1].relations)
            relations.append(relation_name)
            chain.append(entities[object_id])
        if len({e.id for e in chain}) != len(chain) or (chain[0].id, tuple(relations)) in seen:
            continue  # a loop back to an earlier entity makes a trivial question
        seen.add((chain[0].id, tuple(relations)))
        tasks.append(_question_task(chain, relations, split, len(tasks)))
    return tuple(tasks)


def _question_task(chain: list[Entity], relations: list[str], split: str, index: int) -> Task:
    phrase = chain[0].name
    for relation_name in relations:
        phrase = RELATION_BY_NAME[relation_name].phrase.format(s=phrase)
    answer = chain[-1]
    question = f"{'Who' if answer.type == 'person' else 'What'} is {phrase}?"
    hops: list[dict[str, Any]] = [
        {"subject": s.name, "subject_id": s.id, "relation": r, "object": o.name, "object_id": o.id}
        for s, r, o in zip(chain, relations, chain[1:])]
    return Task(id=f"knowledge-{split}-{index:05d}", question=question, answers=(answer.name,),
                metadata={"world": "knowledge", "split": split, "num_hops": len(relations), "hops": hops,
                          "answer_id": answer.id, "answer_type": answer.type},
                data_source="synthetic_knowledge")

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

The fresh-entity world (`fresh_entities=True`) is built so that a small model cannot memorise and must
read: every question is a chain of entities invented for it alone (no entity, and no name word, occurs
in two questions), so no answer recurs and the most common answer is worth ~0 %. Names are 2-3
syllables from a 70-syllable inventory (SYLLABLES) plus the type's suffix, so they tokenize into a
few regular pieces. Only the chain's searched subjects have documents; each states
`facts_per_document` relations in shuffled order (FRESH_RELATIONS: every relation has a sibling of the
same object type, e.g. born_in / lives_in, and the document holds the asked relation and one sibling),
so the question's relation -- not the object's type or the sentence's position -- picks the next
entity. `incoming_mentions` > 0 adds the sentence of the hop that led to a document, and
`filler_sentences` filler; the num_* counts and name_overlap are unused there. Questions are 1-4 hops
as `hop_weights` says; the task metadata has the shared world's shape.
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
# Relations only the fresh-entity world states (KnowledgeWorldConfig.fresh_entities): with them every
# relation has a sibling of the same object type (born_in / lives_in, capital / largest_city, ...), so a
# document that states both makes the question's relation, not the object's type, pick the answer.
FRESH_RELATIONS = RELATIONS + (
    Relation("lives_in", "person", "city", "{s} lives in {o}.", "the city where {s} lives"),
    Relation("invested_in", "person", "company", "{s} invested in {o}.", "the company that {s} invested in"),
    Relation("taught_at", "person", "university", "{s} taught at {o}.", "the university where {s} taught"),
    Relation("inspired_by", "person", "person", "{s} was inspired by {o}.", "the person who inspired {s}"),
    Relation("exports_to", "city", "country", "{s} exports mostly to {o}.", "the country that {s} exports to"),
    Relation("mayor", "city", "person", "The mayor of {s} is {o}.", "the mayor of {s}"),
    Relation("city_founder", "city", "person", "{s} was founded by {o}.", "the founder of {s}"),
    Relation("largest_city", "country", "city", "The largest city of {s} is {o}.", "the largest city of {s}"),
    Relation("president", "country", "person", "The president of {s} is {o}.", "the president of {s}"),
    Relation("prime_minister", "country", "person", "The prime minister of {s} is {o}.",
             "the prime minister of {s}"),
    Relation("run_by", "company", "person", "{s} is run by {o}.", "the chief executive of {s}"),
    Relation("factory_in", "company", "city", "{s} has its main factory in {o}.",
             "the city where {s} has its main factory"),
    Relation("established_by", "university", "person", "{s} was established by {o}.",
             "the person who established {s}"),
    Relation("campus_in", "university", "city", "{s} has a second campus in {o}.",
             "the city where {s} has a second campus"),
)
RELATION_BY_NAME = {relation.name: relation for relation in FRESH_RELATIONS}
# A city reached as a country's capital or largest city lies in that country.
_IN_COUNTRY = ("capital", "largest_city")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "th", "sh", "st", "pl", "vr", "zh", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "x", "k", "th")
# The fresh-entity world's names: every word is 2-3 syllables from this inventory (14 x 5 = 70), so a
# tokenizer learns syllables and copying a name is copying a few regular pieces.
_SYLLABLE_CONSONANTS = "bdfgklmnprstvz"
_SYLLABLE_VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in _SYLLABLE_CONSONANTS for v in _SYLLABLE_VOWELS)
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
    # Fresh-entity world (see the module docstring): every question gets its own invented entities, so
    # nothing recurs between questions; the num_* counts and name_overlap are then unused.
    fresh_entities: bool = False
    facts_per_document: int = 4  # fresh world: relations a document states (the asked one among them)

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
        if self.facts_per_document < 1:
            raise ValueError(f"KnowledgeWorldConfig.facts_per_document must be >= 1, got {self.facts_per_document}")
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
    if config.fresh_entities:
        return _generate_fresh_world(config, seed)
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
                                  "mentions": mentions.get(e.id, [])} for e in world.entities))
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


# ------------------------------------------------------------------------------------ fresh-entity world
def _syllable_word(rng: random.Random, used: set[str]) -> str:
    """A word of 2-3 syllables from SYLLABLES not in `used` (then added to it)."""
    while True:
        word = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if word not in used:
            used.add(word)
            return word


def _syllable_name(kind: str, rng: random.Random, used: set[str]) -> str:
    """A name of a type in the fresh world: fresh syllable words, plus the type's usual suffix."""
    if kind == "person":
        return f"{_syllable_word(rng, used)} {_syllable_word(rng, used)}"
    if kind == "country":
        return _syllable_word(rng, used) + rng.choice(_COUNTRY_SUFFIXES)
    if kind == "company":
        return f"{_syllable_word(rng, used)} {rng.choice(_COMPANY_SUFFIXES)}"
    if kind == "university":
        return f"{_syllable_word(rng, used)} {rng.choice(_UNIVERSITY_SUFFIXES)}"
    return _syllable_word(rng, used)


@dataclasses.dataclass
class _FreshState:
    """What the fresh world's generator accumulates over questions (one instance per call)."""

    rng: random.Random
    used_words: set[str] = dataclasses.field(default_factory=set)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    entities: list[Entity] = dataclasses.field(default_factory=list)
    documents: list[WorldDocument] = dataclasses.field(default_factory=list)

    def new_entity(self, kind: str) -> tuple[str, str]:
        """(id, name) of a new entity of `kind` ('{type}-{index}' ids, as the shared world's)."""
        index = self.counts.get(kind, 0)
        self.counts[kind] = index + 1
        return f"{kind}-{index}", _syllable_name(kind, self.rng, self.used_words)


def _generate_fresh_world(config: KnowledgeWorldConfig, seed: int) -> KnowledgeWorld:
    """The fresh-entity world: each question is a chain of entities made for it alone (module docstring)."""
    state = _FreshState(rng=random.Random(f"knowledge-world-fresh-{seed}"))
    train = tuple(_fresh_question(config, state, "train", i, config.hop_weights)
                  for i in range(config.num_train_questions))
    test = tuple(_fresh_question(config, state, "test", i, config.test_hop_weights or config.hop_weights)
                 for i in range(config.num_test_questions))
    return KnowledgeWorld(config=config, seed=seed, entities=tuple(state.entities),
                          documents=tuple(state.documents), train_tasks=train, test_tasks=test)


def _fresh_question(config: KnowledgeWorldConfig, state: _FreshState, split: str, index: int,
                    hop_weights: Sequence[float]) -> Task:
    """One question with its own entities: each hop's subject gets a document stating
    `facts_per_document` of its relations (the asked one, one of the same object type when its type has
    one, then others), sentences shuffled; objects that no hop searches exist only as names in it."""
    rng = state.rng
    num_hops = rng.choices(range(1, len(hop_weights) + 1), weights=hop_weights)[0]
    kind = rng.choice(ENTITY_TYPES)
    subject_id, subject_name = state.new_entity(kind)
    chain: list[tuple[str, str, str]] = [(subject_id, subject_name, kind)]  # (id, name, type)
    forced: dict[str, str] = {}  # relations fixed by the hop before ("located_in" of a capital)
    relations: list[str] = []
    incoming: str | None = None  # the sentence of the hop that reached this subject
    for _ in range(num_hops):
        subject_id, subject_name, kind = chain[-1]
        own = [r for r in FRESH_RELATIONS if r.subject_type == kind]
        chain_ids = {entity_id for entity_id, _, _ in chain}
        asked = rng.choice([r for r in own if forced.get(r.name) not in chain_ids])
        same = [r for r in own if r.object_type == asked.object_type and r != asked]
        stated = [asked] + rng.sample(same, min(1, len(same)))
        others = [r for r in own if r not in stated]
        stated += rng.sample(others, max(0, min(len(others), config.facts_per_document - len(stated))))
        objects: dict[str, tuple[str, str, str]] = {}
        for relation in stated:
            if relation.name in forced:
                objects[relation.name] = next(e for e in chain if e[0] == forced[relation.name])
            else:
                objects[relation.name] = (*state.new_entity(relation.object_type), relation.object_type)
        sentences = [r.sentence.format(s=subject_name, o=objects[r.name][1]) for r in stated]
        if incoming is not None and config.incoming_mentions > 0:
            sentences.append(incoming)
        fillers = _FILLERS[kind]
        for template in rng.sample(fillers, min(config.filler_sentences, len(fillers))):
            sentences.append(template.format(n=subject_name, hobby=rng.choice(_HOBBIES), thing=rng.choice(_THINGS),
                                             k=rng.randint(2, 90)))
        rng.shuffle(sentences)
        mentioned = [subject_id] + [objects[r.name][0] for r in stated] + ([chain[-2][0]] if incoming else [])
        state.documents.append(WorldDocument(id=subject_id, contents=f"{subject_name}\n" + " ".join(sentences),
                                             entity_ids=tuple(dict.fromkeys(mentioned))))
        state.entities.append(Entity(id=subject_id, name=subject_name, type=kind,
                                     relations=tuple((r.name, objects[r.name][0]) for r in stated)))
        for relation in stated:  # objects no hop searches: names only (the next subject is added above)
            object_id, object_name, object_type = objects[relation.name]
            if relation is not asked and object_id not in chain_ids:
                state.entities.append(Entity(id=object_id, name=object_name, type=object_type, relations=()))
        relations.append(asked.name)
        chain.append(objects[asked.name])
        forced = {"located_in": subject_id} if asked.name in _IN_COUNTRY else {}
        incoming = asked.sentence.format(s=subject_name, o=objects[asked.name][1])
    answer_id, answer_name, answer_type = chain[-1]
    state.entities.append(Entity(id=answer_id, name=answer_name, type=answer_type, relations=()))
    entities = [Entity(id=i, name=n, type=t, relations=()) for i, n, t in chain]
    return _question_task(entities, relations, split, index)

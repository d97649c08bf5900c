"""Writes experiments/data/tiny/: a small deterministic corpus about an invented world, for experiments/tiny.py.

Forty invented cities with a river, a mayor, a founding year and a neighbour. `lm_train.jsonl` /
`lm_eval.jsonl` hold LM documents (facts in shuffled order; eval documents restate facts of the same
world in new orders), `sft_train.jsonl` / `sft_eval.jsonl` one-step agent samples in the full format
(world-model span, then policy span). Run `python experiments/data/make_tiny_corpus.py`; the output
is committed, so the tiny experiment works offline without running this.
"""
import json
import os
import random

SYLLABLES = "ka lo mi ra te vo su ne di pa ro sa li tu me na ko ve".split()
FIRST_NAMES = "Lina Omar Ines Piet Yara Ivo Maya Tomas Edda Rui Noor Sven".split()


def _name(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()


def make_world(seed: int = 0, num_cities: int = 40) -> list[dict]:
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < num_cities:
        names.add(_name(rng, rng.choice((2, 3))))
    cities = sorted(names)
    world = []
    for city in cities:
        world.append({
            "city": city, "river": _name(rng, 2), "mayor": f"{rng.choice(FIRST_NAMES)} {_name(rng, 2)}",
            "founded": rng.randrange(900, 1900), "neighbour": rng.choice([c for c in cities if c != city]),
        })
    return world


def facts(c: dict) -> list[str]:
    return [
        f"{c['city']} lies on the river {c['river']}.",
        f"The mayor of {c['city']} is {c['mayor']}.",
        f"{c['city']} was founded in {c['founded']}.",
        f"The neighbour of {c['city']} is {c['neighbour']}.",
    ]


def lm_docs(world: list[dict], rng: random.Random, copies: int, prefix: str) -> list[dict]:
    docs = []
    for k in range(copies):
        for i, c in enumerate(world):
            sentences = facts(c) + facts(world[(i + k + 1) % len(world)])[: 1 + k % 3]
            rng.shuffle(sentences)
            docs.append({"id": f"{prefix}{k}-{i}", "text": " ".join(sentences)})
    rng.shuffle(docs)
    return docs


def sft_samples(world: list[dict], rng: random.Random, prefix: str) -> list[dict]:
    samples = []
    for i, c in enumerate(world):
        question = f"Who is the mayor of {c['city']}?"
        prompt = f"Answer the question with the search tool.\nQuestion: {question}\n"
        search = (f"<imaginary>search for the mayor of {c['city']}, then answer with the name</imaginary>"
                  f"<keyword>{c['city']}; mayor</keyword><analysis>the name of the mayor is still unknown"
                  f"</analysis><confidence>{rng.randrange(40, 70)}</confidence><think>I should search first."
                  f"</think><action><search>mayor of {c['city']}</search></action>")
        samples.append({"id": f"{prefix}{i}-0", "prompt": prompt, "response": search, "variant": "full"})
        history = (f"{prompt}<action><search>mayor of {c['city']}</search></action>"
                   f"<information>The mayor of {c['city']} is {c['mayor']}.</information>\n")
        answer = (f"<imaginary>answer with the name found</imaginary><keyword>{c['mayor']}</keyword>"
                  f"<analysis>the search result names the mayor</analysis><confidence>{rng.randrange(80, 99)}"
                  f"</confidence><think>The mayor is {c['mayor']}.</think><action><answer>{c['mayor']}"
                  f"</answer></action>")
        samples.append({"id": f"{prefix}{i}-1", "prompt": history, "response": answer, "variant": "full"})
    return samples


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
    os.makedirs(out, exist_ok=True)
    world = make_world()
    rng = random.Random(1)
    write_jsonl(os.path.join(out, "lm_train.jsonl"), lm_docs(world, rng, copies=6, prefix="train"))
    write_jsonl(os.path.join(out, "lm_eval.jsonl"), lm_docs(world, rng, copies=1, prefix="eval"))
    samples = sft_samples(world, rng, prefix="sft")
    write_jsonl(os.path.join(out, "sft_train.jsonl"), samples[:64])
    write_jsonl(os.path.join(out, "sft_eval.jsonl"), samples[64:])


if __name__ == "__main__":
    main()

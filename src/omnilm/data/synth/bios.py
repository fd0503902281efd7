"""Synthetic biographies of fictional people: the embedded default corpus and the fact-learning testbed.

Every person has six attributes. A biography states all six, each with a randomly chosen training template,
in random order, always naming the person in full (so every sentence carries its own key). Files written:

``train.jsonl``     biographies ``{"text", "person_id"}``; person ``i`` (1-based) is drawn with weight
                    ``i^-alpha``; with ``alpha = 0`` every seen person gets exactly ``bios_per_person``;
                    with ``qa_in_pretraining`` also QA documents (questions and answers in plain text) of
                    the people whose QA is for training; with ``reading_in_pretraining`` also reading
                    documents (fresh people's biographies as retrieved passages, a question, its answer)
``eval.jsonl``      one held-out-template sentence per seen person and attribute, value span marked
                    (``value_start``, ``value_end``), for completion probes
``eval_train_templates.jsonl`` the same probes in training templates (new sentences, known wording)
``eval_unseen.jsonl`` the same probes for the people never seen (written only when there are some)
``passages.jsonl``  one more biography per seen person (fresh phrasings): the passages a retrieval index holds
``people.jsonl``    ground truth; ``seen`` is false for the people kept out of all training text and
                    ``qa_split`` says whether their QA pairs are for training (``train``) or testing
``qa.jsonl``        question/answer pairs in chat ``messages`` format, per person, attribute and question
                    phrasing, the reply in ``answer_style`` (people never seen get the answer "I don't know.")
``prefs.jsonl``     preference pairs: the true value is chosen, another person's value rejected
``marginals.json``  per attribute, how many biographies state each value: the no-knowledge baseline
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnilm.data.synth.io import write_jsonl
from omnilm.data.synth.templates import (
    MAJORS,
    MONTHS,
    QUESTIONS,
    TEMPLATES,
    TRAIN_TEMPLATES_PER_ATTRIBUTE,
    UNIVERSITY_PATTERNS,
    UNKNOWN_ANSWER,
)
from omnilm.errors import UserError
from omnilm.utils.atomic import write_json_atomic

ATTRIBUTES = tuple(TEMPLATES)
#: How QA replies may state a fact (:attr:`BiosConfig.answer_style`)
ANSWER_STYLES = ("value", "sentence")


@dataclass
class BiosConfig:
    people: int = 300  # people who appear in the training biographies
    unseen_people: int = 0  # extra people with attributes but no biographies (hallucination probes)
    bios_per_person: int = 50  # mean biographies per seen person (train.jsonl has people × this many)
    alpha: float = 0.0  # sampling weight of person i is i^-alpha; 0 gives every person the same count
    cities: int = 200  # size of the city pool (birth and employer cities)
    companies: int = 200  # size of the employer pool
    universities: int = 100  # size of the university pool
    seed: int = 0
    #: QA text mixed into train.jsonl: this fraction of its documents are question/answer lists of people whose
    #: QA is for training (``qa_split`` train), never of the held-out half (0: biographies only)
    qa_in_pretraining: float = 0.0
    #: Reading documents mixed into train.jsonl: this fraction of its documents are two biographies of fresh
    #: people (drawn for that document alone, in no other file) in the retrieval template, then questions about
    #: them with their answers, so that pre-training itself teaches reading an answer out of the context (0: none)
    reading_in_pretraining: float = 0.0
    #: Questions (with answers) after the passages of each reading document
    reading_questions: int = 2
    #: The first person's ``person_id``: a second set of people (other seed) can sit beside the first one
    first_id: int = 0
    #: How QA replies state a fact: ``value`` (the bare value, "Millermouth") or ``sentence`` (a training
    #: template filled in, "The hometown of Megan Chang is Millermouth.", see :func:`answer_template`). A word
    #: opening a reply is tokenised without the leading space it has in every biography ("M ill er mouth"
    #: against " Miller mouth"), so a small model cannot carry what it read over to such an answer; in the
    #: sentence both the name and the value come after a space, in the biographies' own tokens, and answering
    #: a question becomes completing a sentence it has read.
    answer_style: str = "value"
    #: A biographies folder (its ``people.jsonl``) whose people's names this set never takes, so that a second set
    #: of people (e.g. the readers of a retrieval index) shares no name with the first
    avoid_names_of: str | None = None


@dataclass(frozen=True)
class Person:
    person_id: int
    name: str
    attributes: dict[str, str]
    seen: bool

    def record(self, qa_split: str) -> dict[str, Any]:
        return {"person_id": self.person_id, "name": self.name, **self.attributes, "seen": self.seen,
                "qa_split": qa_split}


def _unique(draw: Any, count: int, what: str, avoid: frozenset[str] = frozenset()) -> list[str]:
    """``count`` distinct values from ``draw()``, none in ``avoid``; fails clearly if the generator runs out of
    variety."""
    values: dict[str, None] = {}
    for _ in range(count * 50):
        value = draw()
        if value not in avoid:
            values[value] = None
        if len(values) == count:
            return list(values)
    raise UserError(f"could not draw {count} distinct {what}; ask for fewer")


def avoided_names(config: BiosConfig) -> frozenset[str]:
    """The names of the people of ``config.avoid_names_of`` (none without it)."""
    if not config.avoid_names_of:
        return frozenset()
    path = Path(config.avoid_names_of) / "people.jsonl"
    if not path.is_file():
        raise UserError(f"avoid_names_of: {path} not found (a folder written by synth_bios)")
    with open(path, encoding="utf-8") as handle:
        return frozenset(json.loads(line)["name"] for line in handle if line.strip())


def make_people(config: BiosConfig) -> list[Person]:
    """The fictional people (seen first, then unseen), deterministic for ``config.seed``."""
    from faker import Faker

    if config.people < 1:
        raise UserError(f"people must be at least 1, got {config.people}")
    faker = Faker("en_US")
    faker.seed_instance(config.seed)
    rng = random.Random(config.seed)
    total = config.people + config.unseen_people
    names = _unique(lambda: f"{faker.first_name()} {faker.last_name()}", total, "full names", avoided_names(config))
    cities = _unique(faker.city, config.cities, "cities")
    companies = _unique(faker.company, config.companies, "companies")

    def university() -> str:
        return rng.choice(UNIVERSITY_PATTERNS).format(city=rng.choice(cities), surname=faker.last_name())

    universities = _unique(university, config.universities, "universities")
    people = []
    for index, name in enumerate(names):
        date = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 1999)}"
        attributes = {"birth_date": date, "birth_city": rng.choice(cities), "university": rng.choice(universities),
                      "major": rng.choice(MAJORS), "employer": rng.choice(companies),
                      "employer_city": rng.choice(cities)}
        people.append(Person(config.first_id + index, name, attributes, seen=index < config.people))
    return people


def sentence(template: str, name: str, value: str) -> tuple[str, int, int]:
    """A template filled in, with the character span of the value."""
    head = template.split("{value}")[0].format(name=name)
    text = template.format(name=name, value=value)
    return text, len(head), len(head) + len(value)


def biography(person: Person, rng: random.Random) -> str:
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    templates = {a: rng.choice(TEMPLATES[a][:TRAIN_TEMPLATES_PER_ATTRIBUTE]) for a in order}
    return " ".join(templates[a].format(name=person.name, value=person.attributes[a]) for a in order)


def probe_records(people: list[Person], rng: random.Random, held_out: bool = True) -> list[dict[str, Any]]:
    """One sentence per person and attribute, with the value's character span marked; the template is a
    held-out one (never in training text) or, with ``held_out=False``, one of the training templates."""
    records = []
    for person in people:
        for attribute in ATTRIBUTES:
            pool = TEMPLATES[attribute]
            split = TRAIN_TEMPLATES_PER_ATTRIBUTE
            template = rng.choice(pool[split:] if held_out else pool[:split])
            text, start, end = sentence(template, person.name, person.attributes[attribute])
            records.append({"text": text, "value_start": start, "value_end": end, "attribute": attribute,
                            "person_id": person.person_id, "value": person.attributes[attribute]})
    return records


def bio_counts(config: BiosConfig, rng: random.Random) -> list[int]:
    """How many biographies each seen person gets."""
    total = config.people * config.bios_per_person
    if config.alpha == 0:
        return [config.bios_per_person] * config.people
    weights = [(i + 1) ** -config.alpha for i in range(config.people)]
    counts = Counter(rng.choices(range(config.people), weights=weights, k=total))
    return [counts[i] for i in range(config.people)]


def passage_records(people: list[Person], rng: random.Random) -> list[dict[str, Any]]:
    """One biography per seen person, ``{"text", "person_id"}``: the documents a retriever searches."""
    return [{"text": biography(p, rng), "person_id": p.person_id} for p in people if p.seen]


def qa_document(person: Person, rng: random.Random) -> str:
    """A person's six facts as questions and answers in plain text, one phrasing per attribute, random order."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    return " ".join(f"{rng.choice(QUESTIONS[a]).format(name=person.name)} {person.attributes[a]}." for a in order)


def mix_qa_documents(bios: list[tuple[Person, str]], people: list[Person], fraction: float,
                     rng: random.Random) -> list[tuple[Person, str]]:
    """``bios`` with QA documents of ``people`` (round robin) making up ``fraction`` of the result, shuffled."""
    if not 0 <= fraction < 1:
        raise UserError(f"qa_in_pretraining must be in [0, 1), got {fraction}")
    if fraction == 0 or not people:
        return bios
    count = round(len(bios) * fraction / (1 - fraction))
    mixed = bios + [(people[i % len(people)], qa_document(people[i % len(people)], rng)) for i in range(count)]
    rng.shuffle(mixed)
    return mixed


def reading_document(pair: Sequence[Person], questions: int, rng: random.Random) -> str:
    """The retrieval template (:func:`omnilm.rag.prompt.render_context`) holding both people's biographies, then
    ``questions`` questions (each about either person) with their answers: text whose answers can only be read,
    never recalled."""
    from omnilm.rag.prompt import render_context

    passages = [biography(p, rng) for p in pair]
    rng.shuffle(passages)
    asked = [(rng.choice(pair), rng.choice(ATTRIBUTES)) for _ in range(questions)]
    questions_and_answers = [(rng.choice(QUESTIONS[a]).format(name=p.name), p.attributes[a]) for p, a in asked]
    (first, answer), *more = questions_and_answers
    return render_context(first, passages) + f"\nAnswer: {answer}" + "".join(
        f"\nQuestion: {question}\nAnswer: {value}" for question, value in more)


def reading_documents(count: int, config: BiosConfig) -> list[str]:
    """``count`` reading documents about ``2 · count`` fresh people (their names, cities, employers and universities
    drawn with another seed than ``config``'s people)."""
    if count == 0:
        return []
    fresh = make_people(BiosConfig(people=2 * count, cities=config.cities, companies=config.companies,
                                   universities=config.universities, seed=config.seed + 7919))
    rng = random.Random(config.seed + 6)
    return [reading_document(fresh[2 * i:2 * i + 2], config.reading_questions, rng) for i in range(count)]


def answer_template(attribute: str) -> str:
    """The template of ``sentence`` replies: the first training template that does not open with the name."""
    return next(t for t in TEMPLATES[attribute][:TRAIN_TEMPLATES_PER_ATTRIBUTE] if not t.startswith("{name}"))


def qa_answer(name: str, attribute: str, value: str, style: str) -> str:
    """The reply stating that ``name``'s ``attribute`` is ``value``, in ``style`` (:attr:`BiosConfig.answer_style`)."""
    return value if style == "value" else answer_template(attribute).format(name=name, value=value)


def answer_matches(response: str, value: str) -> bool:
    """Whether a QA response states ``value`` (exactly, ignoring case, surrounding space and a final period)."""
    def norm(text: str) -> str:
        return " ".join(text.strip().rstrip(".").split()).casefold()

    return norm(response) == norm(value)


def write_bios(config: BiosConfig, out: str | Path) -> dict[str, Any]:
    """Generate every biography file into ``out``; returns counts for the run's records."""
    out = Path(out)
    people = make_people(config)
    if config.answer_style not in ANSWER_STYLES:
        raise UserError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {config.answer_style!r}")
    if config.reading_in_pretraining and config.reading_questions < 1:
        raise UserError(f"reading_questions must be at least 1, got {config.reading_questions}")
    rng = random.Random(config.seed + 1)
    seen = [p for p in people if p.seen]
    counts = bio_counts(config, rng)
    bios = [(person, biography(person, rng)) for person, n in zip(seen, counts, strict=True) for _ in range(n)]
    rng.shuffle(bios)
    # Alternate QA splits within seen and within unseen people, so both halves mix frequent and rare people.
    qa_split = {p.person_id: ("train" if rank % 2 == 0 else "test")
                for group in (seen, [p for p in people if not p.seen]) for rank, p in enumerate(group)}
    # Own generator: without QA text every file is as before.
    documents = mix_qa_documents(bios, [p for p in seen if qa_split[p.person_id] == "train"],
                                 config.qa_in_pretraining, random.Random(config.seed + 4))
    records = [{"text": text, "person_id": p.person_id} for p, text in documents]
    if not 0 <= config.reading_in_pretraining < 1:
        raise UserError(f"reading_in_pretraining must be in [0, 1), got {config.reading_in_pretraining}")
    reading = reading_documents(round(len(records) * config.reading_in_pretraining
                                      / (1 - config.reading_in_pretraining)), config)
    if reading:  # no person_id: these people are nobody the evaluations ask about
        records += [{"text": text, "person_id": None} for text in reading]
        random.Random(config.seed + 6).shuffle(records)
    write_jsonl(out / "train.jsonl", records)

    marginals = {a: Counter() for a in ATTRIBUTES}
    for person, n in zip(seen, counts, strict=True):
        for attribute in ATTRIBUTES:
            marginals[attribute][person.attributes[attribute]] += n
    write_json_atomic(out / "marginals.json", {a: dict(c.most_common()) for a, c in marginals.items()})

    eval_records = probe_records(seen, rng)
    write_jsonl(out / "eval.jsonl", eval_records)
    # Training-template probes: the same facts in the training wording, without the value-type ambiguity an
    # unseen wording adds (own generator: nothing else in the files changes).
    write_jsonl(out / "eval_train_templates.jsonl", probe_records(seen, random.Random(config.seed + 3), False))
    write_jsonl(out / "passages.jsonl", passage_records(seen, random.Random(config.seed + 5)))
    unseen = [p for p in people if not p.seen]
    if unseen:  # own generator, so that adding unseen people changes nothing else in the files
        write_jsonl(out / "eval_unseen.jsonl", probe_records(unseen, random.Random(config.seed + 2)))

    write_jsonl(out / "people.jsonl", (p.record(qa_split[p.person_id]) for p in people))

    qa, prefs = [], []
    for person in people:
        for attribute in ATTRIBUTES:
            value = person.attributes[attribute]
            answer = qa_answer(person.name, attribute, value, config.answer_style) if person.seen else UNKNOWN_ANSWER
            common = {"person_id": person.person_id, "attribute": attribute, "seen": person.seen,
                      "split": qa_split[person.person_id]}
            # Every phrasing of the question, so that a fine-tuned model answers the fact, not one wording.
            for question in (q.format(name=person.name) for q in QUESTIONS[attribute]):
                qa.append({"messages": [{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}], "answer": answer} | common)
                others = [qa_answer(person.name, attribute, p.attributes[attribute], config.answer_style)
                          for p in rng.sample(seen, min(len(seen), 8)) if p.attributes[attribute] != value]
                if others:
                    prefs.append({"prompt": [{"role": "user", "content": question}],
                                  "chosen": [{"role": "assistant", "content": answer}],
                                  "rejected": [{"role": "assistant", "content": others[0]}]} | common)
    write_jsonl(out / "qa.jsonl", qa)
    write_jsonl(out / "prefs.jsonl", prefs)
    return {"people": config.people, "unseen_people": config.unseen_people, "biographies": len(bios),
            "eval_sentences": len(eval_records), "qa_pairs": len(qa), "preference_pairs": len(prefs)}

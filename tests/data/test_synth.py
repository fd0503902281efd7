"""The synthetic corpora: biographies (templates, spans, sampling, QA/preferences) and arithmetic problems."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from omnilm.cli import main
from omnilm.data.synth.arithmetic import ArithmeticConfig, extract_answer, is_correct, write_arithmetic
from omnilm.data.synth.bios import ATTRIBUTES, BiosConfig, answer_matches, answer_template, write_bios
from omnilm.data.synth.templates import TEMPLATES, TRAIN_TEMPLATES_PER_ATTRIBUTE, UNKNOWN_ANSWER
from omnilm.errors import UserError


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def bios(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bios")
    write_bios(BiosConfig(people=30, unseen_people=6, bios_per_person=4, seed=3), out)
    return out


def test_templates_are_well_formed() -> None:
    assert set(TEMPLATES) == set(ATTRIBUTES) and len(ATTRIBUTES) == 6
    for attribute, templates in TEMPLATES.items():
        assert len(templates) == 25 and len(set(templates)) == 25, attribute
        for template in templates:
            assert template.endswith("{value}.") and template.count("{value}") == 1, template
            assert template.count("{name}") == 1, template


def template_regex(template: str) -> re.Pattern:
    head, tail = template.split("{value}")
    return re.compile(re.escape(head).replace(re.escape("{name}"), "(?P<name>.+?)") + "(?P<value>.+?)"
                      + re.escape(tail) + "$")


def test_biographies_state_every_attribute_with_training_templates(bios: Path) -> None:
    people = {p["person_id"]: p for p in read(bios / "people.jsonl")}
    train = read(bios / "train.jsonl")
    assert len(train) == 30 * 4
    assert Counter(r["person_id"] for r in train) == {i: 4 for i in range(30)}  # alpha = 0: equal counts
    train_patterns = {a: [template_regex(t) for t in TEMPLATES[a][:TRAIN_TEMPLATES_PER_ATTRIBUTE]]
                      for a in ATTRIBUTES}
    for record in train:
        person = people[record["person_id"]]
        assert person["seen"]
        sentences = [s + "." for s in record["text"].split(". ") if s]
        sentences[-1] = sentences[-1].removesuffix(".")
        assert len(sentences) == 6
        found = {}
        for s in sentences:
            for attribute, patterns in train_patterns.items():
                if any((m := p.match(s)) and m["name"] == person["name"] and m["value"] == person[attribute]
                       for p in patterns):
                    found[attribute] = True
        assert set(found) == set(ATTRIBUTES), record["text"]


def test_eval_sentences_use_held_out_templates_and_mark_the_value(bios: Path) -> None:
    people = {p["person_id"]: p for p in read(bios / "people.jsonl")}
    records = read(bios / "eval.jsonl")
    assert len(records) == 30 * 6
    for r in records:
        person = people[r["person_id"]]
        assert r["text"][r["value_start"]:r["value_end"]] == person[r["attribute"]] == r["value"]
        assert r["text"][r["value_end"]:] == "."
        held_out = TEMPLATES[r["attribute"]][TRAIN_TEMPLATES_PER_ATTRIBUTE:]
        assert r["text"] in {t.format(name=person["name"], value=r["value"]) for t in held_out}
    train_text = (bios / "train.jsonl").read_text(encoding="utf-8")
    assert not any(r["text"] in train_text for r in records)  # held-out phrasings never occur in training


def test_people_qa_and_preferences(bios: Path) -> None:
    people = read(bios / "people.jsonl")
    assert len({p["name"] for p in people}) == len(people) == 36
    unseen = {p["name"] for p in people if not p["seen"]}
    assert len(unseen) == 6
    train_text = (bios / "train.jsonl").read_text(encoding="utf-8")
    assert not any(name in train_text for name in unseen)
    assert Counter(p["qa_split"] for p in people if p["seen"]) == {"train": 15, "test": 15}
    by_id = {p["person_id"]: p for p in people}
    qa = read(bios / "qa.jsonl")
    assert len(qa) == 36 * 6 * 2  # two question phrasings per attribute
    for r in qa:
        person = by_id[r["person_id"]]
        user, assistant = r["messages"]
        assert user["role"] == "user" and person["name"] in user["content"] and assistant["role"] == "assistant"
        expected = person[r["attribute"]] if person["seen"] else UNKNOWN_ANSWER
        assert assistant["content"] == r["answer"] == expected and r["split"] == person["qa_split"]
        assert answer_matches(expected + ".", expected) and answer_matches(f"  {expected.upper()} ", expected)
    prefs = read(bios / "prefs.jsonl")
    assert len(prefs) > 0.9 * len(qa)
    values = {a: {p[a] for p in people} for a in ATTRIBUTES}
    for r in prefs:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert chosen != rejected and rejected in values[r["attribute"]]


def test_sentence_answers_carry_the_biographies_value_tokens(bios: Path, tmp_path: Path) -> None:
    from omnilm.tokenizer import train_bpe
    from omnilm.tokenizer.chat import encode_chat

    write_bios(BiosConfig(people=30, unseen_people=6, bios_per_person=4, seed=3, answer_style="sentence"), tmp_path)
    with pytest.raises(UserError, match="answer_style must be one of value, sentence"):
        write_bios(BiosConfig(people=3, answer_style="bare"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    for name in ("train.jsonl", "people.jsonl", "eval.jsonl", "passages.jsonl"):  # only the replies change
        assert (tmp_path / name).read_bytes() == (bios / name).read_bytes(), name
    by_id = {p["person_id"]: p for p in read(bios / "people.jsonl")}
    sentences, values = read(tmp_path / "qa.jsonl"), read(bios / "qa.jsonl")
    assert len(sentences) == len(values)
    for sentence, value in zip(sentences, values, strict=True):
        person, attribute = by_id[sentence["person_id"]], sentence["attribute"]
        assert sentence["messages"][0] == value["messages"][0]
        expected = (answer_template(attribute).format(name=person["name"], value=person[attribute])
                    if person["seen"] else UNKNOWN_ANSWER)
        assert sentence["answer"] == sentence["messages"][1]["content"] == expected
    for r in read(tmp_path / "prefs.jsonl"):  # the rejected reply is the same sentence with another person's value
        person, template = by_id[r["person_id"]], answer_template(r["attribute"])
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        match = template_regex(template).match(rejected)
        true = template.format(name=person["name"], value=person[r["attribute"]])
        assert chosen == (true if person["seen"] else UNKNOWN_ANSWER) and rejected != true
        assert match and match["name"] == person["name"]

    # Why the style exists: in a sentence the reply's name and value tokens are those the biographies taught; a
    # word opening the reply is split differently (no leading space), for every attribute but the digit-split dates.
    tokenizer = train_bpe((r["text"] for r in read(bios / "train.jsonl")), 512)

    def reply_holds(record: dict, texts: list[str]) -> bool:
        prompt, _ = encode_chat(tokenizer, record["messages"][:1], add_generation_prompt=True)
        reply = encode_chat(tokenizer, record["messages"])[0][len(prompt):]
        needles = [tokenizer.encode(" " + text) for text in texts]
        return all(any(reply[i:i + len(n)] == n for i in range(len(reply))) for n in needles)

    seen = [(s, v, by_id[s["person_id"]]) for s, v in zip(sentences, values, strict=True)
            if s["seen"] and s["attribute"] == "birth_city"]
    assert all(reply_holds(s, [p["birth_city"], p["name"]]) for s, _, p in seen)
    assert not any(reply_holds(v, [p["birth_city"]]) for _, v, p in seen)


def test_a_second_set_of_people_avoids_the_first_ones_names(bios: Path, tmp_path: Path) -> None:
    # The same seed draws the very same names; told to avoid them, it draws others (and stays deterministic).
    first = {p["name"] for p in read(bios / "people.jsonl")}
    for out in (tmp_path / "a", tmp_path / "b"):
        write_bios(BiosConfig(people=30, unseen_people=6, bios_per_person=0, seed=3, avoid_names_of=str(bios)), out)
    second = [p["name"] for p in read(tmp_path / "a" / "people.jsonl")]
    assert len(set(second)) == 36 and not first & set(second)
    assert (tmp_path / "a" / "people.jsonl").read_bytes() == (tmp_path / "b" / "people.jsonl").read_bytes()
    with pytest.raises(UserError, match="avoid_names_of"):
        write_bios(BiosConfig(people=3, avoid_names_of=str(tmp_path / "missing")), tmp_path / "c")
    # The same from the command line (an optional path setting is a string flag).
    assert main(["data", "synth", "bios", "--people", "30", "--unseen-people", "6", "--bios-per-person", "0",
                 "--seed", "3", "--avoid-names-of", str(bios), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "people.jsonl").read_bytes() == (tmp_path / "a" / "people.jsonl").read_bytes()


def test_marginals_count_value_mentions(bios: Path) -> None:
    marginals = json.loads((bios / "marginals.json").read_text())
    people = [p for p in read(bios / "people.jsonl") if p["seen"]]
    for attribute in ATTRIBUTES:
        assert marginals[attribute] == dict(Counter(p[attribute] for p in people for _ in range(4)))


def test_power_law_sampling_and_determinism(tmp_path: Path) -> None:
    config = BiosConfig(people=50, bios_per_person=40, alpha=1.0, seed=1)
    write_bios(config, tmp_path / "a")
    write_bios(config, tmp_path / "b")
    for name in ("train.jsonl", "eval.jsonl", "qa.jsonl", "prefs.jsonl", "people.jsonl", "marginals.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    counts = Counter(r["person_id"] for r in read(tmp_path / "a" / "train.jsonl"))
    assert sum(counts.values()) == 2000
    harmonic = sum(1 / (i + 1) for i in range(50))
    assert abs(counts[0] / 2000 - 1 / harmonic) < 0.04  # P(1) = 1 / H_50 ≈ 0.22
    assert sum(counts[i] for i in range(5)) > 4 * sum(counts[i] for i in range(45, 50))
    write_bios(BiosConfig(people=50, bios_per_person=40, alpha=1.0, seed=2), tmp_path / "c")
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != (tmp_path / "a" / "train.jsonl").read_bytes()


def evaluate_question(question: str) -> int:
    """An independent reading of a problem's text."""
    value = int(re.match(r"\w+ has (\d+) ", question).group(1))
    for sentence in re.findall(r"Then [^.]*\.", question):
        if m := re.search(r"gets (\d+) more", sentence):
            value += int(m.group(1))
        elif m := re.search(r"gives away (\d+)", sentence):
            value -= int(m.group(1))
        elif m := re.search(r"becomes (\d+) times", sentence):
            value *= int(m.group(1))
        elif m := re.search(r"into (\d+) equal groups", sentence):
            assert value % int(m.group(1)) == 0
            value //= int(m.group(1))
        else:
            raise AssertionError(sentence)
        assert value >= 0
    return value


def test_arithmetic_answers_are_right_and_checkable(tmp_path: Path) -> None:
    counts = write_arithmetic(ArithmeticConfig(problems=300, max_steps=4, seed=5), tmp_path)
    assert counts == {"train": 270, "test": 30, "direct": 0}
    train, test = read(tmp_path / "train.jsonl"), read(tmp_path / "test.jsonl")
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}
    for r in train + test:
        question, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        assert evaluate_question(question) == r["answer"]
        assert extract_answer(reply) == r["answer"] and is_correct(reply, r["answer"])
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", reply):
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                    "/": int(a) // int(b)}[op] == int(c)
    assert extract_answer("no idea") is None and not is_correct("The answer is 3. No, the answer is 4.", 3)


def test_synth_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "bios", "--people", "5", "--bios-per-person", "2", "--out", str(tmp_path)]) == 0
    assert "10 biographies" in capsys.readouterr().out
    assert len(read(tmp_path / "train.jsonl")) == 10
    assert main(["data", "synth", "arithmetic", "--problems", "20", "--out", str(tmp_path / "ar")]) == 0
    assert len(read(tmp_path / "ar" / "test.jsonl")) == 2
    assert main(["data", "synth", "bios", "--people", "0", "--out", str(tmp_path / "x")]) == 2


def test_arithmetic_direct_and_worked_answers(tmp_path: Path) -> None:
    trigger = "Let's think step by step."
    counts = write_arithmetic(ArithmeticConfig(problems=200, direct_fraction=0.25, cot_trigger=trigger), tmp_path)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert counts["direct"] == round(len(train) * 0.25) == sum(r["style"] == "direct" for r in train)
    for r in train:
        question, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        if r["style"] == "direct":
            assert question == r["question"] and reply == f"The answer is {r['answer']}."
        else:
            assert question == f"{r['question']} {trigger}" and reply == r["solution"]
        assert extract_answer(reply) == r["answer"] and r["text"] == f"Question: {question}\nAnswer: {reply}"
    # test problems: never a trigger, always the worked reference; the same problems as without the option
    plain = tmp_path / "plain"
    write_arithmetic(ArithmeticConfig(problems=200), plain)
    assert test == [json.loads(line) for line in (plain / "test.jsonl").read_text().splitlines()]
    assert all(r["messages"][0]["content"] == r["question"] and r["style"] == "worked" for r in test)


def person_named(biography: str) -> str:
    """The full name every sentence of a biography carries."""
    sentences = biography.rstrip(".").split(". ")
    pairs = set(re.findall(r"(?=\b([A-Z][a-z]+ [A-Z][a-z]+))", sentences[0]))
    (name,) = [pair for pair in pairs if all(pair in sentence for sentence in sentences)]
    return name


def test_reading_documents_are_answerable_from_their_passages_only(tmp_path: Path) -> None:
    plain, reading = tmp_path / "plain", tmp_path / "reading"
    write_bios(BiosConfig(people=20, bios_per_person=6, seed=4), plain)
    write_bios(BiosConfig(people=20, bios_per_person=6, seed=4, reading_in_pretraining=0.25), reading)
    for name in ("eval.jsonl", "qa.jsonl", "people.jsonl", "passages.jsonl"):  # only train.jsonl gains documents
        assert (plain / name).read_bytes() == (reading / name).read_bytes(), name
    bios = read(plain / "train.jsonl")
    records = read(reading / "train.jsonl")
    docs = [r["text"] for r in records if r["person_id"] is None]
    assert len(records) == 160 and len(docs) == 40  # a quarter of the documents
    assert sorted(r["text"] for r in records if r["person_id"] is not None) == sorted(r["text"] for r in bios)
    known = {p["name"] for p in read(plain / "people.jsonl")}
    for doc in docs:
        match = re.fullmatch(r"Question: (.+)\nPassages:\n\[1\] (.+)\n\[2\] (.+)\nQuestion: (.+)\nAnswer: (.+)"
                             r"\nQuestion: (.+)\nAnswer: (.+)", doc)
        assert match, doc
        asked_first, first, second, *asked = match.groups()
        assert asked_first == asked[0]  # the template's question before the passages, never an answer
        names = [person_named(first), person_named(second)]
        assert len(set(names)) == 2 and not set(names) & known  # two fresh people, nobody the evaluations know
        for question, answer in zip(asked[::2], asked[1::2], strict=True):
            gold = first if names[0] in question else second
            assert (names[1] in question) == (gold is second)
            assert answer in gold  # the answer is stated in the asked person's passage

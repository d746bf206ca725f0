"""The generated long-context tasks are deterministic, the right length, and their answers are checkable."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from kvgguf.bench.tasks import TASKS, Sample, generate, score


@pytest.fixture(scope="module")
def count(raw_model):
    return lambda text: len(raw_model.tokenize(text, add_special=False))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_samples_are_deterministic_and_sized(task, count):
    a = generate(task, 1024, seed=3, count_tokens=count)
    assert a == generate(task, 1024, seed=3, count_tokens=count)
    assert a != generate(task, 1024, seed=4, count_tokens=count)
    for n_tokens in (512, 2048):
        sample = generate(task, n_tokens, seed=0, count_tokens=count)
        assert 0.85 * n_tokens <= count(sample.context) <= 1.15 * n_tokens, (task, count(sample.context))


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "fact_qa", "prose_fact",
                                  "prose_niah"])
def test_planted_answers_are_in_the_context(task, count):
    sample = generate(task, 1024, seed=1, count_tokens=count)
    for answer in sample.answers:
        assert answer in sample.context
    assert score(sample, sample.context) == 1.0


def test_variable_chain_leads_from_the_value_to_every_answer(count):
    sample = generate("variable_tracking", 1024, seed=2, count_tokens=count)
    value = re.search(r"assigned the value (\d+)", sample.question).group(1)
    holders = {m.group(1) for m in re.finditer(rf"VAR (\w+) = {value}\.", sample.context)}
    for m in re.finditer(r"VAR (\w+) = VAR (\w+)\.", sample.context):
        if m.group(2) in holders:
            holders.add(m.group(1))
    assert holders == set(sample.answers)


def test_common_words_answers_are_the_most_frequent(count):
    sample = generate("common_words", 1024, seed=5, count_tokens=count)
    words = re.findall(r"\d+\. (\w+)", sample.context)
    assert {w for w, _ in Counter(words).most_common(3)} == set(sample.answers)


def hand_made(*answers: str) -> Sample:
    return Sample(task="hand", seed=0, n_tokens_target=64, context="", question="?", answers=answers)


@pytest.mark.parametrize("answers, output, expected", [
    (("4821937",), "The special magic number is 4821937.", 1.0),
    (("4821937",), "It is 4 821 937", 0.0),                  # not the number as written
    (("4821937",), "The number is 48219370.", 0.0),           # a longer number does not count
    (("4821937",), "The number is 7391284.", 0.0),
    (("mango",), "MANGO!", 1.0),
    (("mango",), "Mira likes mangoes", 0.0),
    (("Sea Swift",), "It is called the sea-swift.", 1.0),
    (("1111111", "2222222", "3333333"), "2222222 and 1111111", 2 / 3),
    (("QX", "RT"), "Variables: QX, RT.", 1.0),
])
def test_scorer_accepts_right_and_rejects_wrong(answers, output, expected):
    assert score(hand_made(*answers), output) == pytest.approx(expected)


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        generate("nope", 1024, 0, len)
    with pytest.raises(ValueError, match="n_tokens must be >= 64"):
        generate("niah_single", 10, 0, len)

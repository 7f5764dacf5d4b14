"""Benchmark metrics against values computed by hand, tricky cases first."""

import pytest

from unimoe.evaluation.answers import (
    aokvqa_direct_accuracy,
    exact_match,
    pope_metrics,
    pope_says_no,
)
from unimoe.evaluation.choices import circular_accuracy, extract_letter
from unimoe.evaluation.vqa import process_digit_article, process_punctuation, vqa_accuracy


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,000", "1000"),  # a digit-comma-digit: every mark is deleted, not spaced
        ("yes, it is", "yes it is"),  # a mark next to a space is deleted
        ("black-and-white", "black and white"),  # otherwise replaced by a space
        ("3.5", "3.5"),  # a period before a digit stays
        ("e.g.", "eg"),
        ("Yes.", "Yes"),
    ],
)
def test_official_punctuation_step(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("Two dogs", "2 dogs"), ("a dog", "dog"), ("The None", "0"), ("dont", "don't"), ("its", "its")],
)
def test_official_word_step(text, expected):
    assert process_digit_article(text) == expected


MIXED = ["2"] * 4 + ["3"] * 6


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("two", MIXED, 1.0),  # number word -> digit: leaving out a "2" leaves 3 matches, out of a "3" 4
        ("a dog", ["dog"] * 2 + ["cat"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
        ("its", ["it's"] * 3 + ["no"] * 7, 0.0),  # "its" is not a contraction key: no match
        ("it's", ["it's"] * 3 + ["no"] * 7, (3 * (2 / 3) + 7 * 1) / 10),  # 0.9
        ("Yes.", ["yes"] * 9 + ["no"], 1.0),  # trailing punctuation and case go
        ("Yes!", ["yes"] * 9 + ["no"], 1.0),
        ("yes", ["yes"] * 10, 1.0),
        ("Yes", ["yes"] * 10, 0.0),  # ten identical answers: nothing is processed, "Yes" != "yes"
        # duplicates stay separate answers: leaving one "red" out leaves the other
        ("red", ["red"] * 2 + ["blue"] * 8, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
    ],
)
def test_vqa_accuracy_official(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_always_process_rule():
    assert vqa_accuracy("Yes", ["yes"] * 10, rule="always-process") == 1.0
    assert vqa_accuracy("two", ["2"] * 10, rule="always-process") == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 0.0
    with pytest.raises(ValueError, match="unknown VQA rule"):
        vqa_accuracy("x", ["x"], rule="lenient")


OPTIONS = {"A": "a red car", "B": "a blue bus", "C": "a green tram", "D": "a bike"}


@pytest.mark.parametrize(
    "answer, mmbench, letter",
    [
        ("The answer is (B).", "B", "B"),
        ("b.", None, "B"),  # MMBench's rule reads upper-case letters only
        ("Option C", "C", "C"),
        ("option c", None, "C"),
        ("C", "C", "C"),
        ("[D]", "D", "D"),
        ("Answer: A", "A", "A"),
        ("It is a blue bus.", "B", "B"),  # no letter: the one option whose text occurs
        ("A or B", None, None),  # two letters: undecided
        ("I cannot tell.", None, None),
    ],
)
def test_letter_extraction(answer, mmbench, letter):
    assert extract_letter(answer, OPTIONS, "mmbench") == mmbench
    assert extract_letter(answer, OPTIONS, "letter") == letter


def test_exact_letter_rule():
    assert extract_letter(" B ", OPTIONS, "exact") == "B"
    assert extract_letter("B.", OPTIONS, "exact") is None
    assert extract_letter("The answer is B", OPTIONS, "exact") is None


def test_circular_accuracy_needs_every_rotation():
    assert circular_accuracy(["q1", "q1", "q2", "q2", "q3"], [True, True, True, False, True]) == 2 / 3


@pytest.mark.parametrize(
    "text, no",
    [
        ("Yes, there is a dog.", False),
        ("No, there is not.", True),
        ("There isn't", False),  # the official rule only knows "No", "no" and "not"
        ("", False),
        ("NO", False),
        ("Nope", False),
        ("not sure", True),
        ("Yes. But no.", False),  # only the first sentence counts
    ],
)
def test_pope_reading(text, no):
    assert pope_says_no(text) is no


def test_pope_metrics_by_hand():
    predictions = ["Yes", "No", "yes", "There is no dog.", "Sure"]
    labels = ["yes", "no", "no", "yes", "yes"]
    # said yes: T F T F T; truth yes: T F F T T -> tp 2, tn 1, fp 1, fn 1
    assert pope_metrics(predictions, labels) == pytest.approx(
        {"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 0.6}
    )


def test_aokvqa_direct_answer_is_plain_exact_match():
    answers = ["cat", "cat", "dog", "kitten", "cat", "cat", "pet", "cat", "dog", "cat"]
    assert aokvqa_direct_accuracy("cat", answers) == 1.0
    assert aokvqa_direct_accuracy("dog", answers) == pytest.approx(2 / 3)
    assert aokvqa_direct_accuracy("Cat", answers) == 0.0  # no processing at all
    assert aokvqa_direct_accuracy("a cat", answers) == 0.0


def test_open_answer_exact_match():
    assert exact_match("Yes.", "yes")
    assert exact_match("A dog  barks!", ["a cat meows", "a dog barks"])
    assert not exact_match("dogs", "dog")


def test_pope_lmms_eval_rule_reads_only_exact_yes():
    predictions = ["Yes, there is a dog.", "yes", "No", " YES "]
    labels = ["yes", "yes", "no", "no"]
    official = pope_metrics(predictions, labels)
    lmms = pope_metrics(predictions, labels, rule="lmms-eval")
    assert official["yes_ratio"] == 0.75 and official["accuracy"] == 0.75  # said yes: T T F T
    assert lmms["yes_ratio"] == 0.5 and lmms["accuracy"] == 0.5  # said yes: F T F T

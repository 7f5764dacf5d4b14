"""Open-answer and yes/no metrics: A-OKVQA direct answer, POPE, ClothoAQA.

* A-OKVQA (``eval_predictions.py``): direct answer is ``min(1, exact matches / 3)`` over the ten direct
  answers, no processing and no leave-one-out, on questions not marked ``difficult_direct_answer``;
  multiple choice compares the chosen option's text with the correct one.
* POPE (``evaluate.py``): the first sentence is kept (text before the first ``.``), commas removed, split
  on spaces; the answer is "no" only if a word is exactly ``No``, ``no`` or ``not``, and "yes" otherwise
  (including "NO", "Nope" and empty text). Reported: accuracy, precision, recall, F1, yes-ratio.
  lmms-eval's alternative reads "yes" only for exactly "yes".
* ClothoAQA: exact match after lower-casing and removing punctuation, reported separately for yes/no
  questions (ground truth "yes" or "no") and open ones.
"""

from __future__ import annotations

import string
from collections.abc import Sequence


def aokvqa_direct_accuracy(prediction: str, direct_answers: Sequence[str]) -> float:
    """One A-OKVQA direct answer's score in [0, 1]."""
    return min(1.0, sum(prediction == a for a in direct_answers) / 3.0)


def pope_says_no(text: str) -> bool:
    """Whether POPE's official rule reads ``text`` as "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def pope_metrics(
    predictions: Sequence[str], labels: Sequence[str], rule: str = "pope-official"
) -> dict[str, float]:
    """POPE's numbers for one split; ``labels`` are "yes"/"no". A ratio with a zero denominator
    (where the official script divides by zero) is reported as 0. Rule ``lmms-eval``: an answer is
    "yes" only if, lower-cased and stripped, it is exactly "yes" (lmms-eval's POPE task), so "Yes,
    there is." counts as "no"."""
    if rule == "lmms-eval":
        said_yes = [p.strip().lower() == "yes" for p in predictions]
    else:
        said_yes = [not pope_says_no(p) for p in predictions]
    truth_yes = [label.strip().lower() == "yes" for label in labels]
    tp = sum(p and t for p, t in zip(said_yes, truth_yes, strict=True))
    tn = sum(not p and not t for p, t in zip(said_yes, truth_yes))
    fp = sum(p and not t for p, t in zip(said_yes, truth_yes))
    fn = sum(not p and t for p, t in zip(said_yes, truth_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(said_yes)
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(said_yes) / n if n else 0.0,
    }


_NO_PUNCT = str.maketrans("", "", string.punctuation)


def normalise_open_answer(text: str) -> str:
    """Lower-cased, punctuation removed, whitespace collapsed."""
    return " ".join(text.lower().translate(_NO_PUNCT).split())


def exact_match(prediction: str, answers: Sequence[str] | str) -> bool:
    """Whether the prediction equals any answer after ``normalise_open_answer``."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    return normalise_open_answer(prediction) in {normalise_open_answer(a) for a in answers}

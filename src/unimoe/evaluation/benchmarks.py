"""The Uni-MoE benchmarks: how each is prompted, generated and scored.

Generation defaults are the release's ``eval.py``: greedy with 512 new tokens for VQA-style and MMBench
data, temperature 0.2 with 1024 new tokens for everything else. Every score in ``scores.json`` names the
rule that produced it; a sample whose media could not be read counts as wrong and is counted under
``errors``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .answers import aokvqa_direct_accuracy, exact_match, pope_metrics
from .choices import circular_accuracy, extract_letter
from .vqa import vqa_accuracy

Scorer = Callable[[Sequence[dict], Sequence[str | None], str], dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: ``rules`` lists the scoring rules, the official (default) first; ``paper`` is its
    column in the paper's table (``unimoe eval --report``)."""

    name: str
    modality: str
    scorer: Scorer
    rules: tuple[str, ...]
    greedy: bool
    paper: str | None = None
    needs_judge: bool = False
    headline: str = "accuracy"

    @property
    def max_new_tokens(self) -> int:
        return 512 if self.greedy else 1024

    @property
    def temperature(self) -> float:
        return 0.0 if self.greedy else 0.2


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _answers(target: Mapping[str, Any]) -> list[str]:
    """Human answers of a target: ``answers``, or the release's ``gt`` list (one per annotator)."""
    answers = target.get("answers", target.get("gt"))
    if answers is None:
        raise ValueError("the ground truth has no 'answers' or 'gt'")
    return [answers] if isinstance(answers, str) else [str(a) for a in answers]


def score_vqa(targets, predictions, rule):
    per_type: dict[str, list[float]] = defaultdict(list)
    scores = []
    for target, prediction in zip(targets, predictions, strict=True):
        value = 0.0 if prediction is None else vqa_accuracy(prediction, _answers(target), rule)
        scores.append(value)
        if target.get("answer_type"):
            per_type[target["answer_type"]].append(value)
    out: dict[str, Any] = {"accuracy": 100 * _mean(scores)}
    out.update({f"accuracy/{k}": 100 * _mean(v) for k, v in sorted(per_type.items())})
    return out


def score_aokvqa(targets, predictions, rule):
    """Direct answer (official: questions marked ``difficult_direct_answer`` are left out) or, with
    rule ``multiple-choice``, the chosen option's text against the right one."""
    scores = []
    for target, prediction in zip(targets, predictions, strict=True):
        if rule == "multiple-choice":
            letter = None if prediction is None else extract_letter(prediction, target["options"], "letter")
            chosen = target["options"].get(letter) if letter else prediction
            scores.append(float(chosen == target["choices"][target["correct_choice_idx"]]))
            continue
        if target.get("difficult_direct_answer"):
            continue
        answers = target.get("direct_answers") or _answers(target)
        scores.append(0.0 if prediction is None else aokvqa_direct_accuracy(prediction, answers))
    return {"accuracy": 100 * _mean(scores), "scored": len(scores)}


def score_pope(targets, predictions, rule):
    splits: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for target, prediction in zip(targets, predictions, strict=True):
        label = target.get("label", target.get("gt", target.get("answer")))
        split = target.get("split") or target.get("category") or "all"
        splits[str(_first(split))][0].append("" if prediction is None else prediction)
        splits[str(_first(split))][1].append(str(_first(label)))
    out: dict[str, Any] = {}
    for split, (preds, labels) in sorted(splits.items()):
        out.update(
            {
                f"{split}/{k}": 100 * v if k != "yes_ratio" else v
                for k, v in pope_metrics(preds, labels, rule).items()
            }
        )
    out["accuracy"] = _mean([out[f"{s}/accuracy"] for s in splits])
    out["f1"] = _mean([out[f"{s}/f1"] for s in splits])
    return out


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _letter_correct(target, prediction, rule) -> bool:
    if prediction is None:
        return False
    answer = str(_first(target.get("answer", target.get("gt"))) or "").strip()
    return extract_letter(prediction, target.get("options") or {}, rule) == answer


def score_choice(targets, predictions, rule):
    """Option-letter accuracy, overall and per category."""
    per_category: dict[str, list[bool]] = defaultdict(list)
    correct = []
    for target, prediction in zip(targets, predictions, strict=True):
        ok = _letter_correct(target, prediction, rule)
        correct.append(ok)
        category = _first(target.get("category"))
        if category:
            per_category[str(category)].append(ok)
    out: dict[str, Any] = {"accuracy": 100 * _mean(correct)}
    out.update({f"accuracy/{k}": 100 * _mean(v) for k, v in sorted(per_category.items())})
    return out


def score_mmbench(targets, predictions, rule):
    """Circular accuracy (every rotation right), and the plain accuracy over all rows beside it."""
    correct = [_letter_correct(t, p, rule) for t, p in zip(targets, predictions, strict=True)]
    groups = [str(t.get("group", i)) for i, t in enumerate(targets)]
    return {"circular_accuracy": 100 * circular_accuracy(groups, correct), "accuracy": 100 * _mean(correct)}


def score_clotho_aqa(targets, predictions, rule):
    kinds: dict[str, list[bool]] = defaultdict(list)
    for target, prediction in zip(targets, predictions, strict=True):
        answers = _answers(target)
        kind = "yes_no" if {a.strip().lower() for a in answers} <= {"yes", "no"} else "open"
        kinds[kind].append(prediction is not None and exact_match(prediction, answers))
    out = {f"accuracy/{k}": 100 * _mean(v) for k, v in sorted(kinds.items())}
    out["accuracy"] = 100 * _mean([x for v in kinds.values() for x in v])
    return out


def score_caption(targets, predictions, rule):
    from .captioning import caption_scores

    return caption_scores([_answers(t) for t in targets], predictions, rule)


def score_exact(targets, predictions, rule):
    """The judge-free fallback of judged benchmarks: normalised exact match. Not the official score."""
    hits = [p is not None and exact_match(p, _answers(t)) for t, p in zip(targets, predictions, strict=True)]
    return {"exact_match": 100 * _mean(hits)}


def _benchmarks() -> dict[str, Benchmark]:
    vqa_rules = ("vqa-official", "always-process")
    listing = [
        Benchmark("vqav2", "image", score_vqa, vqa_rules, greedy=True, paper="VQAv2"),
        Benchmark("okvqa", "image", score_vqa, vqa_rules, greedy=True, paper="OK-VQA"),
        Benchmark(
            "aokvqa",
            "image",
            score_aokvqa,
            ("direct-answer", "multiple-choice"),
            greedy=True,
            paper="A-OKVQA",
        ),
        Benchmark(
            "pope",
            "image",
            score_pope,
            ("pope-official", "lmms-eval"),
            greedy=True,
            paper="POPE",
            headline="f1",
        ),
        Benchmark(
            "mmbench",
            "image",
            score_mmbench,
            ("mmbench", "letter"),
            greedy=True,
            paper="MMBench",
            headline="circular_accuracy",
        ),
        Benchmark("seed", "image", score_choice, ("exact", "mmbench", "letter"), greedy=True, paper="SEED"),
        Benchmark(
            "race-audio", "speech", score_choice, ("letter", "mmbench"), greedy=False, paper="RACE-Audio"
        ),
        Benchmark("ehsl", "speech", score_choice, ("letter", "mmbench"), greedy=False, paper="EHSL"),
        Benchmark("clotho-aqa", "audio", score_clotho_aqa, ("exact-match",), greedy=False),
        Benchmark(
            "clotho-caption", "audio", score_caption, ("spider", "cider-d"), greedy=False, headline="cider_d"
        ),
        Benchmark(
            "mmvet", "image", score_exact, ("exact-match",), greedy=True, paper="MM-Vet", needs_judge=True
        ),
        Benchmark("msvd-qa", "video", score_exact, ("exact-match",), greedy=False, needs_judge=True),
        Benchmark(
            "activitynet-qa",
            "video",
            score_exact,
            ("exact-match",),
            greedy=False,
            paper="ActivityNet-QA",
            needs_judge=True,
        ),
    ]
    return {b.name: b for b in listing}


BENCHMARKS = _benchmarks()

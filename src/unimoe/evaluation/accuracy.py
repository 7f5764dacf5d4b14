"""Held-out accuracy per task for closed-answer tasks, and the media-swap control.

Each record carries its task name (``record["task"]``), the gold answer (its last assistant turn) and
the answer set (``record["choices"]``). A prediction is correct when its first word, lower-cased and
stripped of punctuation, equals the gold answer.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from ..processing.conversation import record_media_keys, strip_answer

Answerer = Callable[[list[dict[str, Any]]], list[str]]


def normalise(text: str) -> str:
    """The first word of an answer, lower-cased, punctuation removed."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def gold_answer(record: dict[str, Any]) -> str:
    """The last assistant turn of a record."""
    return [t["value"] for t in record["conversations"] if t["from"] in ("gpt", "assistant")][-1]


def swap_media(records: Sequence[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The control: each record's media replaced by those of another record of the same task.

    A cyclic shift over a shuffled order within each task, so no record keeps its own media while
    prompts and answers stay put. A model whose answers come from the media falls to chance.
    """
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_task[r.get("task", "")].append(i)
    out = [dict(r) for r in records]
    rng = random.Random(seed)
    for indices in by_task.values():
        order = indices[:]
        rng.shuffle(order)
        for src, dst in zip(order[1:] + order[:1], order):
            for key in record_media_keys():
                out[dst].pop(key, None)
                if key in records[src]:
                    out[dst][key] = records[src][key]
    return out


def score(records: Sequence[dict[str, Any]], predictions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Accuracy, chance level and count per task."""
    hits: dict[str, list[bool]] = defaultdict(list)
    chance: dict[str, float] = {}
    for record, prediction in zip(records, predictions, strict=True):
        task = record.get("task", "all")
        hits[task].append(normalise(prediction) == normalise(gold_answer(record)))
        choices = record.get("choices") or []
        chance[task] = 1.0 / len(choices) if choices else 0.0
    return {
        task: {"accuracy": sum(h) / len(h), "chance": chance[task], "n": len(h)}
        for task, h in sorted(hits.items())
    }


def evaluate(records: Sequence[dict[str, Any]], answer: Answerer, control_seed: int = 0) -> dict[str, dict]:
    """Accuracy per task on ``records`` and on their media-swapped control.

    ``answer`` maps prompt-only records to generated answers (a batch at a time is up to it).
    Returns ``{task: {"accuracy", "chance", "control_accuracy", "n"}}`` and the raw predictions
    under the key ``"_predictions"``.
    """
    prompts = [strip_answer(r) for r in records]
    predictions = answer(prompts)
    control_predictions = answer(swap_media(prompts, control_seed))
    main = score(records, predictions)
    control = score(records, control_predictions)
    report: dict[str, Any] = {
        task: {**vals, "control_accuracy": control[task]["accuracy"]} for task, vals in main.items()
    }
    report["_predictions"] = list(predictions)
    return report

"""``unimoe eval``: generate a benchmark's answers on the inference engine (batched, resumable) and score
them with the benchmark's official rule; score predictions made elsewhere; report against the paper.

An output folder holds ``predictions.jsonl`` (one line per answered or failed item, appended and flushed
after every batch, so a killed run resumes where it stopped) and ``scores.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UniMoeConfigError, UniMoeInputError
from .benchmarks import BENCHMARKS, Benchmark
from .formats import (
    LETTER_ANSWER,
    LOADERS,
    SHORT_ANSWER,
    aokvqa_multiple_choice,
    detect_format,
    rotate_options,
)

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
SCORES = "scores.json"
RUN = "run.json"
_SUFFIXES = (SHORT_ANSWER, LETTER_ANSWER)


@dataclass
class EvalSettings:
    """What ``unimoe eval`` runs. Generation settings left as None take the benchmark's defaults (the
    release's); ``prompt_suffix`` replaces the answer-format sentence at the end of each prompt."""

    benchmark: str
    data: Path
    out: Path | None = None
    media_root: Path | None = None
    annotations: Path | None = None
    data_format: str | None = None
    rule: str | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    seed: int = 0
    prompt_suffix: str | None = None
    limit: int | None = None
    circular: bool = True
    judge: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> Benchmark:
        if self.benchmark not in BENCHMARKS:
            raise UniMoeConfigError(f"unknown benchmark {self.benchmark!r}; choose from {sorted(BENCHMARKS)}")
        return BENCHMARKS[self.benchmark]

    def chosen_rule(self) -> str:
        spec = self.spec()
        rule = self.rule or spec.rules[0]
        if rule not in spec.rules:
            raise UniMoeConfigError(f"{spec.name}: unknown rule {rule!r}; choose from {list(spec.rules)}")
        return rule


def load_items(settings: EvalSettings) -> list[dict[str, Any]]:
    """The benchmark's items from ``settings.data`` (format detected unless given)."""
    spec = settings.spec()
    data = Path(settings.data)
    fmt = settings.data_format or detect_format(data)
    if fmt not in LOADERS:
        raise UniMoeConfigError(f"unknown data format {fmt!r}; choose from {sorted(LOADERS)}")
    items = LOADERS[fmt](data, annotations=settings.annotations, out=settings.out)
    if spec.name == "aokvqa" and settings.chosen_rule() == "multiple-choice" and fmt == "aokvqa":
        items = aokvqa_multiple_choice(items)
    if spec.name == "mmbench" and settings.circular and fmt == "mmbench":  # release files carry their own
        items = rotate_options(items)
    if settings.limit is not None:
        items = items[: settings.limit]
    if settings.prompt_suffix is not None:
        for item in items:
            _replace_suffix(item["record"], settings.prompt_suffix)
    ids = [item["id"] for item in items]
    if len(set(ids)) != len(ids):
        raise UniMoeInputError(f"{data}: item ids are not unique")
    return items


def _replace_suffix(record: dict[str, Any], suffix: str) -> None:
    turn = record["conversations"][-1]
    text = turn["value"].rstrip()
    for known in _SUFFIXES:
        if text.endswith(known):
            text = text[: -len(known)].rstrip()
            break
    turn["value"] = f"{text}\n{suffix}" if suffix else text


def generation_params(settings: EvalSettings):
    """The function giving each item its ``GenerationParams``: the benchmark's defaults, the settings'
    overrides, and a seed of its own from the item id (sampled answers do not depend on batching)."""
    from ..inference.engine import GenerationParams

    spec = settings.spec()
    temperature = spec.temperature if settings.temperature is None else settings.temperature
    max_new_tokens = settings.max_new_tokens or spec.max_new_tokens

    def params(record: dict[str, Any]) -> GenerationParams:
        digest = hashlib.sha256(f"{settings.seed}:{record['id']}".encode()).digest()
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=settings.top_p,
            seed=int.from_bytes(digest[:4], "little"),
        )

    return params


def run_eval(engine, settings: EvalSettings, progress: bool = True) -> dict[str, Any]:
    """Answers every item not yet in ``<out>/predictions.jsonl`` and writes ``<out>/scores.json``."""
    from ..inference.batch import answer_records

    if settings.out is None:
        raise UniMoeConfigError("unimoe eval needs --out (where predictions and scores go)")
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_items(settings)
    params = generation_params(settings)
    example = params({"id": ""})
    generation = {
        "max_new_tokens": example.max_new_tokens,
        "temperature": example.temperature,
        "top_p": example.top_p,
    }
    _check_resumable(out, settings, generation, getattr(engine, "name", None))
    summary = answer_records(
        engine,
        (item["record"] for item in items),
        out / PREDICTIONS,
        params,
        batch_size=settings.batch_size,
        media_root=settings.media_root,
        progress=progress,
    )
    logger.info(
        "%s: %d answered, %d failed, %d already done",
        settings.benchmark,
        summary.answered,
        summary.failed,
        summary.skipped,
    )
    scores = score_items(settings, items, read_predictions(out / PREDICTIONS), generation)
    (out / SCORES).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    return scores


def _check_resumable(out: Path, settings: EvalSettings, generation: dict, model: str | None) -> None:
    """Records what the predictions in ``out`` are made with (``run.json``); a rerun that would
    generate differently must use a new folder, so no file mixes two settings."""
    made_with = {
        "benchmark": settings.benchmark,
        "data": str(settings.data),
        "model": model,
        "generation": generation,
        "seed": settings.seed,
        "prompt_suffix": settings.prompt_suffix,
        "circular": settings.circular,
    }
    record = out / RUN
    if record.is_file() and (out / PREDICTIONS).is_file():
        before = json.loads(record.read_text())
        changed = sorted(k for k in made_with if before.get(k) != made_with[k])
        if changed:
            raise UniMoeConfigError(
                f"{out} holds predictions made with other settings ({', '.join(changed)}); choose a new --out"
            )
    record.write_text(json.dumps(made_with, indent=2) + "\n")


def read_predictions(
    path: Path, id_field: str | None = None, answer_field: str | None = None
) -> dict[str, Any]:
    """``{id: answer text or {"error": ...}}`` from our ``predictions.jsonl``, the release's ``eval.py``
    output (one JSON array of its input records with ``text``, or in the 8-expert version ``answer``,
    overwritten by the model's output) or any JSON/JSONL with id and answer fields."""
    path = Path(path)
    if not path.is_file():
        raise UniMoeInputError(f"predictions file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            raise json.JSONDecodeError("JSON lines", text, 0)
        rows = json.loads(text)
        if isinstance(rows, dict):  # one record, or {id: answer}
            ids = (id_field,) if id_field else ("question_id", "id")
            rows = [rows] if any(k in rows for k in ids) else [{"id": k, "text": v} for k, v in rows.items()]
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UniMoeInputError(f"{path}:{number}: invalid JSON: {err}") from err
    out: dict[str, Any] = {}
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UniMoeInputError(f"{path}: entry {number} is not an object")
        key = id_field or next((k for k in ("question_id", "id") if k in row), None)
        if key is None or key not in row:
            raise UniMoeInputError(f"{path}: entry {number} has no id field ({id_field or 'question_id/id'})")
        if "error" in row and answer_field is None:
            out[str(row[key])] = {"error": row["error"]}
            continue
        field_name = answer_field or "text"
        if field_name not in row:
            raise UniMoeInputError(f"{path}: entry {number} has no answer field {field_name!r}")
        out[str(row[key])] = str(row[field_name])
    return out


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def score_items(
    settings: EvalSettings,
    items: list[dict[str, Any]],
    predictions: dict[str, Any],
    generation: dict | None = None,
) -> dict[str, Any]:
    """The ``scores.json`` content: metrics under the chosen rule, counts, and what produced them."""
    spec = settings.spec()
    rule = settings.chosen_rule()
    targets, answers = [], []
    errors, missing = [], []
    for item in items:
        target = dict(item["target"])
        if spec.name == "mmbench" and "group" not in target:  # release ids end in the TSV index
            match = _TRAILING_NUMBER.search(item["id"])
            target["group"] = str(int(match.group(1)) % 1_000_000) if match else item["id"]
        prediction = predictions.get(item["id"])
        if isinstance(prediction, dict):
            errors.append({"id": item["id"], "error": prediction["error"]})
            prediction = None
        elif prediction is None:
            missing.append(item["id"])
        targets.append(target)
        answers.append(prediction)
    judged = None
    if spec.needs_judge and settings.judge.get("url"):
        from .judge import judge_scores

        judged = judge_scores(spec.name, items, answers, settings.judge)
    named = rule  # what scores.json names: the rule, and a judge where one read answers
    if judged:
        named = judged["rule"]
    elif spec.name == "mmbench" and settings.judge.get("url"):
        from .judge import judge_letters

        answers = judge_letters(items, answers, settings.judge, rule)
        named = f"{rule}+judge:{settings.judge.get('model') or 'judge'}"
    metrics = judged["metrics"] if judged else spec.scorer(targets, answers, rule)
    scores: dict[str, Any] = {
        "benchmark": spec.name,
        "data": str(settings.data),
        "rule": named,
        "official": bool(judged) or (not spec.needs_judge and rule == spec.rules[0]),
        "metrics": metrics,
        "n": len(items),
        "answered": len(items) - len(errors) - len(missing),
        "errors": len(errors),
        "missing": len(missing),
        "error_ids": errors,
        "missing_ids": missing[:100],
    }
    if spec.needs_judge and not judged:
        scores["note"] = (
            f"{spec.name}'s official score needs a judge model (--judge-url, --judge-model); "
            "the exact-match fallback above is not that score"
        )
    if generation is not None:
        scores["generation"] = generation
    scores["settings"] = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k != "judge"
    }
    return scores


def score_only(
    settings: EvalSettings,
    predictions_path: Path,
    id_field: str | None = None,
    answer_field: str | None = None,
) -> dict[str, Any]:
    """Scores predictions made elsewhere against the ground truth of ``settings.data``."""
    items = load_items(settings)
    scores = score_items(settings, items, read_predictions(predictions_path, id_field, answer_field))
    scores["predictions"] = str(predictions_path)
    if settings.out is not None:
        Path(settings.out).mkdir(parents=True, exist_ok=True)
        (Path(settings.out) / SCORES).write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    return scores

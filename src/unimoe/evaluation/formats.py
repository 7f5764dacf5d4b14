"""Benchmark files in, evaluation items out.

An item is ``{"id", "record", "target"}``: ``record`` is the prompt in the release's data format (media
keys and one ``human`` turn), what the engine answers; ``target`` is what the scorer needs (human
answers, options and the right letter, a yes/no label, references ...).

Formats:

* ``release``: the release's eval JSON (``Uni_MoE/data_sample/*.json``: ``question_id`` or ``id``,
  ``image`` / ``voice`` / ``video``, ``text``, ``gt``, ``answer``, ``category``, ``conversations``); the
  prompt is the record's own.
* ``vqa``: VQAv2 / OK-VQA questions JSON, with ``annotations`` the annotations JSON.
* ``pope``: POPE's JSONL (``question_id``, ``image``, ``text``, ``label``), the split from the file name.
* ``aokvqa``: A-OKVQA's JSON list.
* ``mmbench``: MMBench's TSV with base64 images (decoded once into ``<out>/media``).
* ``seed``: SEED-Bench's JSON (image questions).

Prompts built from official files follow LLaVA-1.5's wording, as the release's own eval files do.
"""

from __future__ import annotations

import base64
import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UniMoeInputError

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"

Item = dict[str, Any]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UniMoeInputError(f"data file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UniMoeInputError(f"{path} is not valid JSON: {err}") from err


def _prompt_record(item_id: str, text: str, **media: Any) -> dict[str, Any]:
    return {"id": item_id, **media, "conversations": [{"from": "human", "value": text}]}


def _options_text(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


_OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.)]\s*(.+?)\s*$")


def options_in_prompt(text: str) -> dict[str, str]:
    """Options written one per line as ``A. text`` / ``A.text`` / ``(A) text`` in a prompt."""
    options: dict[str, str] = {}
    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match.group(1) not in options and (not options or match.group(1) > max(options)):
            options[match.group(1)] = match.group(2)
    return options


# ---- the release's eval JSON ------------------------------------------------------------------


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def load_release(path: Path, **_: Any) -> list[Item]:
    """The release's eval records; ``target`` holds ``gt``, ``answer``, ``category`` and, for option
    questions, the options read from the prompt."""
    records = _read_json(path)
    if not isinstance(records, list):
        raise UniMoeInputError(f"{path}: expected a JSON list of records")
    items = []
    for number, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise UniMoeInputError(f"{path}: entry {number} is not a record with 'conversations'")
        item_id = str(record.get("question_id", record.get("id", number)))
        turns = list(record["conversations"])
        while turns and turns[-1].get("from") in ("gpt", "assistant"):
            turns.pop()
        prompt = {k: v for k, v in record.items() if k in ("image", "video", "voice", "speech", "audio")}
        prompt.update(id=item_id, conversations=turns)
        human = " ".join(t.get("value", "") for t in turns)
        target = {k: record[k] for k in ("gt", "answer", "category", "label", "text") if k in record}
        target["options"] = options_in_prompt(human)
        target["question"] = record.get("text", human)
        items.append({"id": item_id, "record": prompt, "target": target})
    return items


# ---- official distributions -------------------------------------------------------------------


def load_vqa(path: Path, annotations: Path | None = None, **_: Any) -> list[Item]:
    """VQAv2 / OK-VQA: questions JSON and annotations JSON; COCO images by the questions' subtype."""
    if annotations is None:
        raise UniMoeInputError(f"{path}: VQA questions need --annotations (the annotations JSON)")
    questions = _read_json(path)
    by_id = {a["question_id"]: a for a in _read_json(annotations).get("annotations", [])}
    subtype = questions.get("data_subtype", "val2014")
    items = []
    for q in questions.get("questions", []):
        annotation = by_id.get(q["question_id"])
        if annotation is None:
            raise UniMoeInputError(f"{annotations}: no annotation for question {q['question_id']}")
        image = f"{subtype}/COCO_{subtype}_{q['image_id']:012d}.jpg"
        text = f"<image>\n{q['question']}\n{SHORT_ANSWER}"
        target = {
            "answers": [a["answer"] for a in annotation["answers"]],  # one per annotator, duplicates kept
            "answer_type": annotation.get("answer_type"),
            "question_type": annotation.get("question_type"),
        }
        items.append(
            {
                "id": str(q["question_id"]),
                "record": _prompt_record(str(q["question_id"]), text, image=image),
                "target": target,
            }
        )
    return items


def load_pope(path: Path, **_: Any) -> list[Item]:
    """POPE JSONL; the split (adversarial, popular, random) from the file name, or ``category``."""
    from ..data.dataset import MalformedRecord, iter_jsonl

    split = next((s for s in ("adversarial", "popular", "random") if s in path.name), "all")
    items = []
    for number, line in iter_jsonl(path):
        if isinstance(line, MalformedRecord):
            raise UniMoeInputError(f"{line.position}: {line.reason}")
        item_id = str(line.get("question_id", number))
        text = f"<image>\n{line['text']}\n{SHORT_ANSWER}"
        target = {"label": line["label"], "split": line.get("category", split)}
        items.append(
            {"id": item_id, "record": _prompt_record(item_id, text, image=line["image"]), "target": target}
        )
    return items


def load_aokvqa(path: Path, **_: Any) -> list[Item]:
    """A-OKVQA's JSON; COCO 2017 images by ``split`` (default val)."""
    items = []
    for q in _read_json(path):
        options = dict(zip(LETTERS, q["choices"], strict=False))
        split = q.get("split", "val")
        image = f"{split}2017/{q['image_id']:012d}.jpg"
        target = {
            "direct_answers": q.get("direct_answers", []),
            "difficult_direct_answer": q.get("difficult_direct_answer", False),
            "choices": q["choices"],
            "correct_choice_idx": q.get("correct_choice_idx"),
            "options": options,
        }
        item_id = str(q["question_id"])
        text = f"<image>\n{q['question']}\n{SHORT_ANSWER}"
        items.append({"id": item_id, "record": _prompt_record(item_id, text, image=image), "target": target})
    return items


def aokvqa_multiple_choice(items: list[Item]) -> list[Item]:
    """A-OKVQA items with the options in the prompt and a letter asked for."""
    out = []
    for item in items:
        target = item["target"]
        question = item["record"]["conversations"][0]["value"].split("\n")[1]
        text = f"<image>\n{question}\n{_options_text(target['options'])}\n{LETTER_ANSWER}"
        record = {**item["record"], "conversations": [{"from": "human", "value": text}]}
        out.append({**item, "record": record})
    return out


def load_mmbench(path: Path, out: Path | None = None, **_: Any) -> list[Item]:
    """MMBench's TSV; images (base64) are written once under ``out/media/mmbench``. Rows whose ``index``
    is 10^6 or more are rotations of ``index mod 10^6`` (one circular group)."""
    if not path.is_file():
        raise UniMoeInputError(f"data file not found: {path}")
    media_dir = (out or path.parent) / "media" / "mmbench"
    media_dir.mkdir(parents=True, exist_ok=True)
    csv.field_size_limit(sys.maxsize)
    items = []
    with open(path, encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file, delimiter="\t"):
            index = int(row["index"])
            image = media_dir / f"{index}.jpg"
            if not image.is_file() and row.get("image"):
                try:
                    image.write_bytes(base64.b64decode(row["image"], validate=True))
                except ValueError as err:
                    raise UniMoeInputError(
                        f"{path}: row {index} has an image that is not base64: {err}"
                    ) from err
            options = {c: row[c] for c in LETTERS if row.get(c) not in (None, "", "nan")}
            hint = row.get("hint") or ""
            hint = "" if hint == "nan" else hint
            text = "\n".join(
                p for p in ("<image>", hint, row["question"], _options_text(options), LETTER_ANSWER) if p
            )
            target = {
                "answer": row.get("answer"),
                "options": options,
                "group": str(index % 1_000_000),
                "category": row.get("category"),
            }
            item_id = str(index)
            items.append(
                {"id": item_id, "record": _prompt_record(item_id, text, image=str(image)), "target": target}
            )
    return items


def load_seed(path: Path, **_: Any) -> list[Item]:
    """SEED-Bench's JSON: the image questions (``data_type`` image); images at ``data_id``."""
    data = _read_json(path)
    types = {v: k for k, v in data.get("question_type", {}).items()}
    items = []
    for q in data.get("questions", []):
        if q.get("data_type", "image") != "image":
            continue
        options = {
            letter: q[f"choice_{letter.lower()}"] for letter in "ABCD" if f"choice_{letter.lower()}" in q
        }
        text = f"<image>\n{q['question']}\n{_options_text(options)}\n{LETTER_ANSWER}"
        target = {"answer": q["answer"], "options": options, "category": types.get(q.get("question_type_id"))}
        item_id = str(q["question_id"])
        items.append(
            {"id": item_id, "record": _prompt_record(item_id, text, image=q["data_id"]), "target": target}
        )
    return items


LOADERS: dict[str, Callable[..., list[Item]]] = {
    "release": load_release,
    "vqa": load_vqa,
    "pope": load_pope,
    "aokvqa": load_aokvqa,
    "mmbench": load_mmbench,
    "seed": load_seed,
}


def detect_format(path: Path) -> str:
    """The format of a data file, from its name and first bytes."""
    if path.suffix == ".tsv":
        return "mmbench"
    if path.suffix == ".jsonl":
        return "pope"
    if not path.is_file():
        raise UniMoeInputError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as file:
        head = file.read(4096).lstrip()
    if head.startswith("{"):
        if '"questions"' not in head:
            return "pope"  # one JSON object per line, as POPE ships it
        seed = '"choice_a"' in head or '"question_type"' in head  # VQA questions have neither
        return "seed" if seed and '"data_subtype"' not in head else "vqa"
    if '"conversations"' in head:
        return "release"
    if '"direct_answers"' in head or '"choices"' in head:
        return "aokvqa"
    return "release"


def rotate_options(items: list[Item]) -> list[Item]:
    """MMBench's circular evaluation: each question with its options written in the prompt also asked
    with the options rotated (``id-r1``, ``id-r2``, ...; the right letter moved along), all in one
    ``group``. Data that already holds rotations (rows sharing a group) is returned as it is."""
    groups = [item["target"].get("group", item["id"]) for item in items]
    if len(set(groups)) < len(groups):
        return items
    out = []
    for item in items:
        target = item["target"]
        target.setdefault("group", item["id"])
        out.append(item)
        options, answer = target.get("options") or {}, _first(target.get("answer"))
        prompt = item["record"]["conversations"][-1]["value"]
        block = _options_text(options)
        if len(options) < 2 or answer not in options or block not in prompt:
            continue
        letters, texts = list(options), list(options.values())
        for shift in range(1, len(letters)):
            rotated = {letters[i]: texts[(i + shift) % len(texts)] for i in range(len(letters))}
            moved = letters[(letters.index(answer) - shift) % len(letters)]
            record = {**item["record"], "id": f"{item['id']}-r{shift}"}
            record["conversations"] = [
                *item["record"]["conversations"][:-1],
                {"from": "human", "value": prompt.replace(block, _options_text(rotated))},
            ]
            out.append(
                {
                    "id": record["id"],
                    "record": record,
                    "target": {**target, "options": rotated, "answer": moved},
                }
            )
    return out

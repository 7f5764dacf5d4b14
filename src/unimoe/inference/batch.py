"""Batch generation over a JSONL file, resumable: ``unimoe generate --input IN --output OUT``.

Records decode with continuous batching (``unimoe.inference.continuous``). Input lines are records in
the release's data format (``{"id", "image", "video", "voice" / "speech" /
"audio", "conversations"}``, a trailing ``gpt`` turn ignored) or chat messages (``{"id",
"messages"}``). Each output line is ``{"id", "text", "prompt_tokens", "completion_tokens",
"finish_reason"}``, or ``{"id", "error"}`` for a record that could not be answered. Output is appended
and flushed line by line, in input order; a rerun skips the ids already in the output file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ..data.dataset import MalformedRecord, iter_jsonl
from ..errors import UniMoeInputError
from ..processing.processor import EncodedSample
from .engine import GenerationParams, Result, UniMoeEngine

# Bad input (UniMoeInputError is a ValueError; odd field types raise TypeError or KeyError) or a
# record too big to run (out of memory is a RuntimeError): the record gets an error line.
RECOVERABLE = (ValueError, TypeError, KeyError, RuntimeError)


@dataclass
class BatchSummary:
    """Counts of one run."""

    total: int = 0
    skipped: int = 0
    answered: int = 0
    failed: int = 0


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file (``unimoe.data.dataset.iter_jsonl``); a line that is not a JSON object
    becomes ``{"id": "line-N", "error": ...}``. Records without an id get ``line-N``."""
    for number, item in iter_jsonl(path):
        if isinstance(item, MalformedRecord):
            yield {"id": f"line-{number}", "error": f"{item.position}: {item.reason}"}
            continue
        item.setdefault("id", f"line-{number}")
        yield item


def finished_ids(path: str | Path) -> set[str]:
    """Ids already in an output file. A truncated last line (an interrupted write) is removed."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        path.write_bytes(data)
    done = set()
    for line in data.decode("utf-8").splitlines():
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return done


def conversation_of(record: dict[str, Any]) -> list[dict] | dict:
    """What the engine answers for a record: its ``messages`` or the record itself."""
    if "messages" in record:
        return record["messages"]
    if "conversations" in record:
        return record
    raise UniMoeInputError(f"record {record.get('id')!r}: needs 'conversations' or 'messages'")


def _answer(record_id: Any, result: Result) -> dict[str, Any]:
    return {
        "id": record_id,
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
    }


def _failure(record_id: Any, exc: Exception) -> dict[str, Any]:
    return {"id": record_id, "error": f"{type(exc).__name__}: {exc}"}


def answer_batch(
    engine: UniMoeEngine,
    records: list[dict],
    params: GenerationParams | list[GenerationParams],
    media_root: str | Path | None,
) -> list[dict[str, Any]]:
    """Output lines for a batch of records (``params`` shared or one per record). Each record is
    encoded alone (a bad one gets an error line); the rest run as one batch, and if that fails, one
    by one."""
    rows = params if isinstance(params, list) else [params] * len(records)
    lines: dict[int, dict] = {}
    encoded: list[tuple[int, EncodedSample]] = []
    for i, record in enumerate(records):
        if "error" in record:
            lines[i] = {"id": record["id"], "error": record["error"]}
            continue
        try:
            encoded.append((i, engine.encode(conversation_of(record), media_root)))
        except RECOVERABLE as exc:
            lines[i] = _failure(record["id"], exc)
    try:
        results = engine.generate_encoded([s for _, s in encoded], [rows[i] for i, _ in encoded])
        lines.update({i: _answer(records[i]["id"], r) for (i, _), r in zip(encoded, results)})
    except RECOVERABLE:
        for i, sample in encoded:
            try:
                lines[i] = _answer(records[i]["id"], engine.generate_encoded([sample], [rows[i]])[0])
            except RECOVERABLE as exc:
                lines[i] = _failure(records[i]["id"], exc)
    return [lines[i] for i in range(len(records))]


def run_batch(
    engine: UniMoeEngine,
    input_path: str | Path,
    output_path: str | Path,
    params: GenerationParams,
    batch_size: int = 8,
    media_root: str | Path | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> BatchSummary:
    """Answers every record of ``input_path`` not yet in ``output_path``, appending to it."""
    return answer_records(
        engine, read_records(input_path), output_path, params, batch_size, media_root, progress, log
    )


def answer_records(
    engine: UniMoeEngine,
    records: Iterable[dict[str, Any]],
    output_path: str | Path,
    params: GenerationParams | Callable[[dict[str, Any]], GenerationParams],
    batch_size: int = 8,
    media_root: str | Path | None = None,
    progress: bool = True,
    log: TextIO | None = None,
) -> BatchSummary:
    """Answers every record (each with an ``id``) not yet in ``output_path``, appending to it.
    ``params``: shared, or a function of the record.

    Records decode with continuous batching (up to ``batch_size`` rows; a finished row's place goes
    to the next record at once), driven from this thread between encoding records (so the model keeps
    this thread's intra-op threads). Lines are written in input order, each as soon as it and every
    line before it are done, and flushed.
    """
    from .continuous import ContinuousBatcher

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    done = finished_ids(output_path)
    todo, seen = [], set(done)
    summary = BatchSummary()
    for record in records:
        summary.total += 1
        key = str(record["id"])
        if key in seen:
            summary.skipped += 1
            continue
        seen.add(key)
        todo.append(record)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    ahead = 2 * batch_size  # records encoded and queued beyond those written
    batcher = ContinuousBatcher(engine, max_rows=batch_size, max_queue=ahead + 2)
    bar = tqdm(total=len(todo), disable=not progress, unit="record", file=log or sys.stderr)
    pending: list[tuple[dict, Any, Future | dict]] = []  # input order: record, params, future or line

    def write_ready(out, block: bool) -> None:
        while pending:
            record, rows, item = pending[0]
            if isinstance(item, Future):
                if not (block or item.done()):
                    return
                try:
                    item = _answer(record["id"], item.result())
                except UniMoeInputError as exc:
                    item = _failure(record["id"], exc)
                except RECOVERABLE:  # the shared batch failed (out of memory, ...): this record alone
                    item = answer_batch(engine, [record], [rows], media_root)[0]
            pending.pop(0)
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
            out.flush()
            failed = "error" in item
            summary.failed += failed
            summary.answered += not failed
            bar.update(1)

    with open(output_path, "a", encoding="utf-8") as out, bar:
        for record in todo:
            rows = params(record) if callable(params) else params
            if "error" in record:
                pending.append((record, rows, {"id": record["id"], "error": record["error"]}))
            else:
                try:
                    sample = engine.encode(conversation_of(record), media_root)
                    pending.append((record, rows, batcher.submit(sample, rows)))
                except RECOVERABLE as exc:
                    pending.append((record, rows, _failure(record["id"], exc)))
            while len(pending) > ahead and batcher.pump():
                write_ready(out, block=False)
            write_ready(out, block=False)
        while batcher.pump():
            write_ready(out, block=False)
        write_ready(out, block=True)  # idle: every answer is in
    return summary

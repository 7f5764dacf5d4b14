"""Training data: records from JSON/JSONL, a lazily encoding dataset and a collator that drops bad samples.

A record is encoded (media loaded and featurised, placeholders expanded, labels masked) only when the
loader asks for it. A record that cannot be encoded (missing or corrupt media, malformed record,
placeholder/media mismatch, too long) becomes a ``SkippedSample`` naming the reason; the collator drops
it and counts it in the batch, so a run goes on and reports how many samples it lost and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..errors import UniMoeInputError
from ..modalities import media, media_names, placeholder_pattern
from ..processing.conversation import VOICE_KEY, record_media_keys
from ..processing.processor import IGNORE_INDEX, EncodedSample, UniMoeProcessor

logger = logging.getLogger(__name__)


@dataclass
class MalformedRecord:
    """A line or entry of the data file that is not a record (kept so that it is reported, not lost)."""

    position: str
    reason: str


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict | MalformedRecord]]:
    """``(line number, record)`` for each non-blank line of a JSONL file, streamed. A line that is not
    valid JSON or not a JSON object comes back as a ``MalformedRecord`` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UniMoeInputError(f"data file not found: {path}")
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            position = f"{path.name}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                yield number, MalformedRecord(position, f"invalid JSON: {err}")
                continue
            if not isinstance(item, dict):
                yield number, MalformedRecord(position, f"not a mapping: {type(item).__name__}")
                continue
            yield number, item


@dataclass
class SkippedSample:
    """What ``__getitem__`` returns for a sample that cannot be used."""

    index: int
    record_id: str
    reason: str


def load_records(path: str | Path) -> list[dict | MalformedRecord]:
    """Records of a JSON list (the release's format) or a JSONL file (one record per line).

    A JSONL line that does not parse, or an entry that is not a mapping, is kept as a
    ``MalformedRecord``; a JSON file that does not parse raises ``UniMoeInputError``.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return [item for _, item in iter_jsonl(path)]
    if not path.is_file():
        raise UniMoeInputError(f"data file not found: {path}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UniMoeInputError(f"{path}: invalid JSON: {err}") from err
    if not isinstance(items, list):
        raise UniMoeInputError(f"{path}: expected a JSON list of records")
    return [
        item
        if isinstance(item, dict)
        else MalformedRecord(f"{path.name}[{i}]", f"not a mapping: {type(item).__name__}")
        for i, item in enumerate(items)
    ]


def record_modalities(
    record: Mapping[str, Any] | MalformedRecord, voice_modality: str = "speech"
) -> list[str]:
    """The modalities a record carries, in ``unimoe.modalities`` order; ``["text"]`` for a text-only
    record. ``voice`` files count as ``voice_modality``."""
    if isinstance(record, MalformedRecord):
        return ["text"]
    present = {k for k in record_media_keys() if record.get(k)}
    if VOICE_KEY in present:
        present.add(voice_modality)
    kinds = [m for m in media_names() if m in present]
    return kinds or ["text"]


def estimate_length(record: Mapping[str, Any] | MalformedRecord, tokens_per_media: Mapping[str, int]) -> int:
    """A cheap token-count estimate (text characters / 4 + media tokens) used to group similar lengths."""
    if isinstance(record, MalformedRecord):
        return 0
    turns = record.get("conversations")
    text = (
        "".join(t.get("value", "") for t in turns if isinstance(t, Mapping))
        if isinstance(turns, list)
        else ""
    )
    media = sum(tokens_per_media.get(m.group(1), 0) for m in placeholder_pattern().finditer(text))
    return len(text) // 4 + media


def record_id(record: Mapping[str, Any] | MalformedRecord, index: int) -> str:
    """A printable name for a record: its ``id``, else its position."""
    if isinstance(record, MalformedRecord):
        return record.position
    return str(record.get("id", f"#{index}"))


# Encoded samples kept by every caching data set of this process, shared by data sets that read the
# same records through equal processors (the stages of one run re-read one data file): per
# (media root, processor fingerprint), each record's encoding by the record's JSON text.
_ENCODED: dict[tuple[str, str], dict[str, EncodedSample]] = {}


def processor_fingerprint(processor: UniMoeProcessor) -> str:
    """Equal for processors that encode every record alike: settings, featurisers and tokenizer."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        asdict(processor.settings),
        processor.image_processor.to_dict() if processor.image_processor is not None else None,
        processor.feature_extractor.to_dict(),
        backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        tokenizer.chat_template,
    ]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def clear_encoded_cache() -> None:
    """Drops the encoded samples that caching data sets keep."""
    _ENCODED.clear()


class SupervisedDataset(Dataset):
    """Records encoded on access by a ``UniMoeProcessor``; media paths resolve against ``media_root``.

    ``__getitem__`` returns an ``EncodedSample``, or a ``SkippedSample`` when the record is unusable.
    """

    def __init__(
        self,
        records: Sequence[dict | MalformedRecord],
        processor: UniMoeProcessor,
        media_root: str | Path | None = None,
        cache: bool = False,
    ):
        self.records = list(records)
        self.processor = processor
        self.media_root = media_root
        self._cache: dict[str, EncodedSample] | None = None
        self._keys: dict[int, str] = {}  # a record's JSON text, made once per index
        self._skipped: dict[int, SkippedSample] = {}
        if cache:
            key = (str(Path(media_root).resolve()) if media_root else "", processor_fingerprint(processor))
            self._cache = _ENCODED.setdefault(key, {})

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        processor: UniMoeProcessor,
        media_root: str | Path | None = None,
        tasks: Sequence[str] | None = None,
        max_samples: int | None = None,
        cache: bool = False,
    ) -> SupervisedDataset:
        """Records of ``path`` (optionally only those whose ``task`` is in ``tasks``, at most
        ``max_samples``); ``media_root`` defaults to the file's folder. ``cache`` keeps encoded samples
        in memory after their first use (for small data sets trained for several epochs), shared with
        later caching data sets of the same records, media root and processor in this process."""
        records = load_records(path)
        if tasks is not None:
            wanted = set(tasks)
            records = [r for r in records if isinstance(r, dict) and r.get("task") in wanted]
        if max_samples is not None:
            records = records[:max_samples]
        return cls(records, processor, Path(path).parent if media_root is None else media_root, cache)

    def __len__(self) -> int:
        return len(self.records)

    def modality_groups(self) -> list[str]:
        """Per record, its media kinds joined by ``+`` (``image``, ``image+speech``, ``text``...)."""
        voice = self.processor.settings.voice_modality
        return ["+".join(record_modalities(r, voice)) for r in self.records]

    def lengths(self) -> list[int]:
        """Per record, ``estimate_length``."""
        s = self.processor.settings
        per_media = {m.name: s.tokens(m.kind) for m in media()}
        return [estimate_length(r, per_media) for r in self.records]

    def __getitem__(self, index: int) -> EncodedSample | SkippedSample:
        record = self.records[index]
        if self._cache is None or isinstance(record, MalformedRecord):
            return self._encode(index)
        key = self._keys.get(index)
        if key is None:
            key = self._keys[index] = json.dumps(record, sort_keys=True)
        sample = self._cache.get(key) or self._skipped.get(index)
        if sample is None:
            sample = self._encode(index)
            if isinstance(sample, SkippedSample):  # it names this data set's position: kept here only
                self._skipped[index] = sample
            else:
                self._cache[key] = sample
        return sample

    def _encode(self, index: int) -> EncodedSample | SkippedSample:
        record = self.records[index]
        name = record_id(record, index)
        if isinstance(record, MalformedRecord):
            return self._skip(index, name, record.reason)
        try:
            return self.processor.encode_record(record, self.media_root)
        except UniMoeInputError as err:
            return self._skip(index, name, str(err))

    @staticmethod
    def _skip(index: int, name: str, reason: str) -> SkippedSample:
        logger.warning("skipping sample %s: %s", name, reason)
        return SkippedSample(index, name, reason)


@dataclass
class TrainBatch:
    """A padded micro-batch plus what the loop needs to weight it and to report skipped samples.

    ``inputs`` are the model's keyword arguments; ``target_tokens`` counts supervised next-token
    targets (labels after the one-token shift); ``filler`` is true when every sample was bad and
    ``inputs`` hold a text-only stand-in without targets (so that every process still runs a step).
    ``media_items`` are the samples' media tensors by modality, in the order of their rows in
    ``inputs`` (what ``FrozenFeatureCache`` keys on).
    """

    inputs: dict[str, torch.Tensor]
    num_samples: int
    tokens: int
    target_tokens: int
    skipped: list[SkippedSample] = field(default_factory=list)
    filler: bool = False
    media_items: dict[str, list[torch.Tensor]] = field(default_factory=dict)


FILLER_RECORD = {
    "id": "filler",
    "conversations": [{"from": "human", "value": "."}, {"from": "gpt", "value": "."}],
}


class Collator:
    """Pads encoded samples with the processor, dropping (and counting) ``SkippedSample`` items."""

    def __init__(self, processor: UniMoeProcessor, padding_side: str = "right"):
        self.processor = processor
        self.padding_side = padding_side

    def filler(self) -> EncodedSample:
        """A text-only sample whose labels are all ignored."""
        sample = self.processor.encode_record(FILLER_RECORD)
        sample.labels = [IGNORE_INDEX] * len(sample.labels)
        return sample

    def __call__(self, items: Sequence[EncodedSample | SkippedSample]) -> TrainBatch:
        skipped = [s for s in items if isinstance(s, SkippedSample)]
        good = [s for s in items if isinstance(s, EncodedSample)]
        samples = good or [self.filler()]
        inputs = dict(self.processor.collate(samples, padding_side=self.padding_side))
        labels = inputs["labels"]
        return TrainBatch(
            inputs=inputs,
            num_samples=len(good),
            tokens=int(inputs["attention_mask"].sum()),
            target_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
            skipped=skipped,
            filler=not good,
            media_items={m.name: [t for s in good for t in s.media[m.name]] for m in media()},
        )

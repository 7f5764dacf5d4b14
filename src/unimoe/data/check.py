"""``unimoe data check``: find every problem of a training file before a run meets it.

Each record is checked for structure (a mapping with a valid ``conversations`` list), placeholder/media
agreement (every ``<image>``/``<video>``/``<speech>``/``<audio>`` has a media item and vice versa),
media that are missing and media that cannot be decoded, and, when a processor is given, the length
after media expansion. Checking continues past problems; the report counts each kind and keeps the
first offenders.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UniMoeInputError
from ..processing.conversation import record_turns
from ..processing.media import load_audio, load_image, load_video
from .dataset import MalformedRecord, load_records, record_id

KINDS = ("malformed", "placeholder_mismatch", "missing_media", "unreadable_media", "too_long")


@dataclass
class CheckReport:
    """Problem counts per kind and the first offenders (``"record: message"``) of each kind."""

    records: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    bad_records: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not any(self.counts.values())

    def add(self, kind: str, name: str, message: str, limit: int) -> None:
        """Counts one problem."""
        self.counts[kind] += 1
        if len(self.examples[kind]) < limit:
            self.examples[kind].append(f"{name}: {message}")

    def format(self) -> str:
        """A human-readable summary."""
        lines = [f"{self.records} records, {self.bad_records} with problems"]
        for kind in KINDS:
            if self.counts[kind]:
                lines.append(f"{kind}: {self.counts[kind]}")
                lines += [f"  {example}" for example in self.examples[kind]]
        return "\n".join(lines)


def _media_items(turns) -> Iterable[tuple[str, Any]]:
    for _, parts in turns:
        for part in parts:
            if isinstance(part, tuple):
                yield part


def _check_media(
    modality: str, source: Any, media_root: Path, video_frames: int, decode: bool
) -> tuple[str, str] | None:
    """``(kind, message)`` of the problem with one media item, or None."""
    sources = source if isinstance(source, list) else [source]
    paths = [Path(s) if Path(s).is_absolute() else media_root / s for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        return "missing_media", f"{modality} file not found: {', '.join(missing)}"
    if not decode:
        return None
    try:
        if modality == "image":
            load_image(paths[0])
        elif modality == "video":
            load_video(paths if isinstance(source, list) else paths[0], video_frames)
        else:
            load_audio(paths[0])
    except UniMoeInputError as err:
        return "unreadable_media", str(err)
    return None


def _check_record(record, index: int, media_root: Path, report: CheckReport, options: dict) -> None:
    name = record_id(record, index)
    before = sum(report.counts.values())
    limit = options["limit"]
    if isinstance(record, MalformedRecord):
        report.add("malformed", name, record.reason, limit)
    else:
        try:
            turns = record_turns(record, options["voice_modality"])
        except UniMoeInputError as err:
            kind = "placeholder_mismatch" if "placeholder" in str(err) else "malformed"
            report.add(kind, name, str(err), limit)
            turns = None
        media_ok = True
        for modality, source in _media_items(turns or []):
            problem = _check_media(modality, source, media_root, options["video_frames"], options["decode"])
            if problem is not None:
                media_ok = False
                report.add(problem[0], name, problem[1], limit)
        processor = options["processor"]
        if turns is not None and media_ok and processor is not None:
            try:
                processor.encode_record(record, media_root)
            except UniMoeInputError as err:
                report.add("too_long" if "exceed" in str(err) else "malformed", name, str(err), limit)
    if sum(report.counts.values()) > before:
        report.bad_records += 1


def check_data(
    path: str | Path,
    media_root: str | Path | None = None,
    processor=None,
    voice_modality: str = "speech",
    decode: bool = True,
    limit: int = 5,
    video_frames: int = 8,
) -> CheckReport:
    """Checks every record of a JSON/JSONL training file (see the module docstring).

    ``processor``: a ``UniMoeProcessor`` to also encode each record (length limit, feature extraction);
    ``decode=False`` only checks that media files exist; ``limit``: offenders kept per kind.
    """
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    if processor is not None:
        voice_modality = processor.settings.voice_modality
        video_frames = processor.settings.video_frames
    options = dict(voice_modality=voice_modality, decode=decode, limit=limit, video_frames=video_frames)
    options["processor"] = processor
    report = CheckReport()
    records = load_records(path)
    report.records = len(records)
    for index, record in enumerate(records):
        _check_record(record, index, root, report, options)
    return report

"""A small synthetic multimodal instruction set with real media files, generated from a seed.

``synthesize(out_dir)`` writes ``train.json`` and ``heldout.json`` (lists of records in the
training-data format, see below) and their media under ``out_dir/media/``. Every task has a closed
answer set (``record["choices"]``, single words), so accuracy against chance is well defined.

The tasks and their media are in ``unimoe.demo.tasks``; the demo's are ``TASKS``, the ablation's
``ABLATION_TASKS``.

Design choices:

- Video direction survives mean pooling. A model that averages per-frame features over evenly
  spaced frames cannot see frame order, so the direction is written into the frames themselves:
  the moving shape grows (55% -> 100%) and brightens (30% -> 100%) as it travels and leaves a
  fading trail. Each frame is then a comet, dim and narrow behind and bright and wide ahead, and
  so is the mean of any subset of frames (the tests check a nearest-centroid classifier on mean
  frames).
- Answers are balanced within each split and task; the question is drawn from 2-3 paraphrases.
- Determinism: each (seed, split, task) has its own random stream, so the same arguments give
  byte-identical JSON and media, and selecting a subset of tasks does not change their samples.

Record format (paths relative to ``out_dir``; one placeholder per media item, in order)::

    {"id": "train-image_shape-00000", "task": "image_shape",
     "image": "media/img/train-image_shape-00000.png",      # optional, one image
     "video": "media/vid/...mp4",                            # optional, one clip
     "speech": ["media/speech/...wav"], "audio": ["media/audio/...wav"],   # optional lists
     "conversations": [{"from": "human", "value": "<image>\\nWhat shape is this?"},
                       {"from": "gpt", "value": "circle"}],
     "choices": ["circle", "square", "triangle", "cross"],
     "captions": ["a red circle"]}                           # one per media item, in order

The release keeps speech and audio under one ``voice`` key; separate keys say which encoder to use.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UniMoeInputError
from .synth_media import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    SOUNDS,
    SPEECH_WORDS,
    render_sound,
    write_mp4,
    write_png,
    write_wav,
)
from .tasks import (
    ALL_TASKS,
    MAKERS,
    TASK_SPECS,
    TASKS,
    Context,
    Media,
    TaskSpec,
    moving_clip,
    pick,
    shape_image,
    speech_clip,
)

SPLITS = ("train", "heldout")

_MEDIA_LAYOUT: dict[str, tuple[str, str, Callable[[Path, np.ndarray], None]]] = {
    "image": ("img", ".png", write_png),
    "video": ("vid", ".mp4", write_mp4),
    "speech": ("speech", ".wav", write_wav),
    "audio": ("audio", ".wav", write_wav),
}


def _write_media(out_dir: Path, record_id: str, media: list[Media]) -> list[tuple[str, str]]:
    """Write each media item under ``out_dir/media``; returns (kind, path relative to out_dir)."""
    written = []
    for k, (kind, data, _) in enumerate(media):
        folder, suffix, write = _MEDIA_LAYOUT[kind]
        name = record_id if len(media) == 1 else f"{record_id}-{k}"
        rel = f"media/{folder}/{name}{suffix}"
        write(out_dir / rel, data)
        written.append((kind, rel))
    return written


def _record(
    record_id: str,
    spec: TaskSpec,
    paths: list[tuple[str, str]],
    captions: list[str],
    question: str,
    answer: str,
) -> dict[str, Any]:
    """One training record: media keys, a single-turn conversation, the closed answer set and a
    caption per media item."""
    record: dict[str, Any] = {"id": record_id, "task": spec.name}
    for kind, rel in paths:
        record.setdefault(kind, []).append(rel)
    for kind in ("image", "video"):  # one image or clip is a plain path, as in the release's format
        if len(record.get(kind, ())) == 1:
            record[kind] = record[kind][0]
    prompt = "".join(f"<{kind}>\n" for kind, _ in paths) + question
    record["conversations"] = [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    record["choices"] = list(spec.choices)
    record["captions"] = captions
    return record


def _generate(out_dir: Path, task: str, n: int, seed: int, ctx: Context) -> list[dict[str, Any]]:
    """``n`` records of ``task`` for ``ctx.split`` with balanced answers, media written to disk."""
    spec, make = TASK_SPECS[task], MAKERS[task]
    rng = np.random.default_rng([seed, SPLITS.index(ctx.split), ALL_TASKS.index(task)])
    answers = rng.permutation(np.resize(np.arange(len(spec.choices)), n))
    records = []
    for i, a in enumerate(answers):
        answer = spec.choices[a]
        made = make(answer, rng, ctx)
        media, fields = made if isinstance(made, tuple) else (made, {})
        record_id = f"{ctx.split}-{task}-{i:05d}"
        question = pick(spec.questions, rng).format(**fields)
        paths = _write_media(out_dir, record_id, media)
        captions = [caption for _, _, caption in media]
        records.append(_record(record_id, spec, paths, captions, question, answer))
    return records


def _check_args(image_size: int, n_frames: int, counts: Sequence[int], tasks: Sequence[str]) -> None:
    """Raise ``UniMoeInputError`` on arguments ``synthesize`` cannot honour."""
    if image_size < 16 or image_size % 2:
        raise UniMoeInputError(f"image_size must be an even number >= 16, got {image_size}")
    if n_frames < 2:
        raise UniMoeInputError(f"n_frames must be >= 2 (direction needs motion), got {n_frames}")
    if min(counts) < 0:
        raise UniMoeInputError(f"sample counts must be >= 0, got {list(counts)}")
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown:
        raise UniMoeInputError(f"unknown task(s) {unknown}; expected a subset of {list(ALL_TASKS)}")


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int | Mapping[str, int] = 240,
    n_heldout: int = 40,
    image_size: int = 32,
    tasks: Sequence[str] | None = None,
    n_frames: int = 8,
) -> dict[str, dict[str, Any]]:
    """Write the synthetic instruction set to ``out_dir`` and return a per-task summary.

    Writes ``train.json`` and ``heldout.json`` (``n_train`` / ``n_heldout`` records per task;
    ``n_train`` may map each task to its own count) and media under
    ``out_dir/media/{img,vid,speech,audio}/``: ``image_size`` x ``image_size`` PNGs,
    ``n_frames``-frame mp4 clips of the same size, 16 kHz mono PCM16 wavs. ``tasks`` selects
    tasks of ``ALL_TASKS`` (default: the demo's ``TASKS``). The output is a deterministic function of
    the arguments.

    Returns ``{task: {"train": int, "heldout": int, "choices": [...], "chance": float}}``.
    """
    selected = list(TASKS if tasks is None else tasks)
    if isinstance(n_train, Mapping):
        missing = [t for t in selected if t not in n_train]
        if missing:
            raise UniMoeInputError(f"n_train gives no count for task(s) {missing}")
        train_counts = {t: int(n_train[t]) for t in selected}
    else:
        train_counts = dict.fromkeys(selected, n_train)
    _check_args(image_size, n_frames, (*train_counts.values(), n_heldout), selected)
    out = Path(out_dir)
    for folder, _, _ in _MEDIA_LAYOUT.values():
        (out / "media" / folder).mkdir(parents=True, exist_ok=True)
    for split, counts in zip(SPLITS, (train_counts, dict.fromkeys(selected, n_heldout))):
        ctx = Context(split=split, image_size=image_size, n_frames=n_frames)
        records = [r for task in selected for r in _generate(out, task, counts[task], seed, ctx)]
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return {
        task: {
            "train": train_counts[task],
            "heldout": n_heldout,
            "choices": list(TASK_SPECS[task].choices),
            "chance": 1.0 / len(TASK_SPECS[task].choices),
        }
        for task in selected
    }


@dataclass
class PretrainingCorpus:
    """Captioned media for the encoders' own pre-training, in memory.

    ``images``: uint8 [H, W, 3] still shapes with ``captions`` such as ``"a red circle"``; ``clips``:
    uint8 [F, H, W, 3] moving shapes with ``clip_captions`` such as ``"a red circle moving left"``;
    ``speech``: float32 clips with their ``transcripts``; ``sounds``: float32 clips with
    ``sound_labels`` (indices into ``SOUNDS``).
    """

    images: list[np.ndarray]
    captions: list[str]
    clips: list[np.ndarray]
    clip_captions: list[str]
    speech: list[np.ndarray]
    transcripts: list[str]
    sounds: list[np.ndarray]
    sound_labels: list[int]


def pretraining_corpus(
    seed: int = 0,
    n_images: int = 1200,
    n_clips: int = 300,
    n_speech: int = 600,
    n_sounds: int = 500,
    image_size: int = 32,
    n_frames: int = 8,
) -> PretrainingCorpus:
    """A corpus disjoint from the instruction set (its own random streams) for encoder pre-training.

    Each part (images, clips, speech, sounds) draws from a stream of its own, so a part does not depend
    on the sizes of the others: the demo makes the vision and the audio parts in two processes.
    Speech uses only the training voices, so held-out speech stays unheard.
    """
    image_rng, clip_rng, speech_rng, sound_rng = (
        np.random.default_rng([seed, len(SPLITS), part]) for part in range(4)
    )
    ctx = Context(split="train", image_size=image_size, n_frames=n_frames)
    stills = [
        shape_image(pick(SHAPES, image_rng), pick(tuple(COLORS), image_rng), image_rng, ctx)
        for _ in range(n_images)
    ]
    moving = [
        moving_clip(
            pick(SHAPES, clip_rng), pick(tuple(COLORS), clip_rng), pick(DIRECTIONS, clip_rng), clip_rng, ctx
        )
        for _ in range(n_clips)
    ]
    transcripts = [pick(SPEECH_WORDS, speech_rng) for _ in range(n_speech)]
    speech = [speech_clip(word, speech_rng, ctx) for word in transcripts]
    sound_labels = [int(sound_rng.integers(len(SOUNDS))) for _ in range(n_sounds)]
    sounds = [render_sound(SOUNDS[k], sound_rng) for k in sound_labels]
    return PretrainingCorpus(
        images=[data for _, data, _ in stills],
        captions=[caption for _, _, caption in stills],
        clips=[data for _, data, _ in moving],
        clip_captions=[caption for _, _, caption in moving],
        speech=speech,
        transcripts=transcripts,
        sounds=sounds,
        sound_labels=sound_labels,
    )

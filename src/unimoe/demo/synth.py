"""A small synthetic multimodal instruction set with real media files, generated from a seed.

``synthesize(out_dir)`` writes ``train.json`` and ``heldout.json`` (lists of records in the
training-data format, see below) and their media under ``out_dir/media/``. Every task has a closed
answer set (``record["choices"]``, single words), so accuracy against chance is well defined.

Tasks:

- ``image_shape``: a solid circle/square/triangle/cross on a plain background -> the shape.
- ``image_color``: the same kind of image -> its colour (red/green/blue/yellow).
- ``video_direction``: a shape crossing the frame -> left/right/up/down.
- ``video_color``: the same kind of clip -> the colour of the moving shape.
- ``speech_word``: one spoken word (circle/square/triangle/cross/one/two) -> the word.
- ``audio_sound``: a non-speech sound -> hum (low tone), beep (high tone), chirp (rising sweep),
  noise (white-noise burst) or clicks (click train).
- ``cross_speech_image``: a shape image plus a spoken shape name -> yes/no (balanced), whether the
  word names the shape.

The ablation suite (``ABLATION_TASKS``, ``unimoe.ablation``) adds harder tasks from the same media:
two media of one modality in a prompt, questions that bind attributes, and a second cross-modal task.

- ``image_pair_color``: two images of different shapes and colours; "What color is the {shape}?" names
  one of them -> its colour.
- ``image_pair_same``: two images -> yes/no, whether they show the same shape (colours independent).
- ``video_check``: a clip and "Is the {color} {shape} moving {direction}?" -> yes/no; a "no" question
  gets exactly one of the three attributes wrong.
- ``speech_pair_second``: two spoken words -> the second word.
- ``audio_pair_second``: two sounds -> the second sound.
- ``audio_pair_same``: two sounds -> yes/no, whether they are of the same kind.
- ``cross_speech_video``: a clip plus a spoken shape name -> yes/no, whether the word names the moving
  shape.

Design choices:

- Video direction survives mean pooling. A model that averages per-frame features over evenly
  spaced frames cannot see frame order, so the direction is written into the frames themselves:
  the moving shape grows (55% -> 100%) and brightens (30% -> 100%) as it travels and leaves a
  fading trail. Each frame is then a comet, dim and narrow behind and bright and wide ahead, and
  so is the mean of any subset of frames (the tests check a nearest-centroid classifier on mean
  frames).
- Speech is real synthetic speech: the package ships a bank of espeak-ng clips
  (``unimoe/assets/speech/{word}_{variant}.wav``, made by ``scripts/make_speech_bank.sh``), eight
  voice/speed/pitch variants per word. Training samples use variants 0-5 and held-out samples use
  variants 6-7 (``HELDOUT_SPEECH_VARIANTS``), so held-out accuracy measures generalisation to unseen
  voices. Every sample is further augmented (speed +-8%, gain, leading/trailing silence, noise).
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

from unimoe.demo.synth_media import (
    COLORS,
    DIRECTIONS,
    SHAPES,
    SOUNDS,
    SPEECH_WORDS,
    augment_speech,
    load_speech_bank,
    render_moving_shape,
    render_shape_image,
    render_sound,
    write_mp4,
    write_png,
    write_wav,
)
from unimoe.errors import UniMoeInputError

SPLITS = ("train", "heldout")
HELDOUT_SPEECH_VARIANTS = (6, 7)

Media = tuple[str, np.ndarray, str]  # (kind: image|video|speech|audio, data, caption)
# a task maker's output: the media, and the fields its question template names (if any)
Made = list[Media] | tuple[list[Media], dict[str, str]]


@dataclass(frozen=True)
class TaskSpec:
    """A task's name, closed answer set and question paraphrases."""

    name: str
    choices: tuple[str, ...]
    questions: tuple[str, ...]


@dataclass(frozen=True)
class _Context:
    """Per-split generation settings shared by the task makers."""

    split: str
    image_size: int
    n_frames: int


TASK_SPECS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "image_shape",
            SHAPES,
            ("What shape is this?", "Which shape is shown in the picture?", "Name the shape in the image."),
        ),
        TaskSpec(
            "image_color",
            tuple(COLORS),
            ("What color is the shape?", "Which color does the shape have?", "Name the color of the shape."),
        ),
        TaskSpec(
            "video_direction",
            DIRECTIONS,
            ("Which way is the shape moving?", "In which direction does the object move?"),
        ),
        TaskSpec(
            "video_color",
            tuple(COLORS),
            ("What color is the moving shape?", "Which color is the object in the video?"),
        ),
        TaskSpec(
            "speech_word",
            SPEECH_WORDS,
            ("What word is spoken?", "Which word do you hear?", "Transcribe the spoken word."),
        ),
        TaskSpec(
            "audio_sound",
            SOUNDS,
            ("What sound is this?", "Which kind of sound do you hear?", "Name the sound."),
        ),
        TaskSpec(
            "cross_speech_image",
            ("yes", "no"),
            (
                "Does the spoken word name the shape in the picture?",
                "Is the shape in the image the one that is said?",
                "Does the word you hear match the shape shown?",
            ),
        ),
        TaskSpec(
            "image_pair_color",
            tuple(COLORS),
            ("What color is the {shape}?", "Which color does the {shape} have?"),
        ),
        TaskSpec(
            "image_pair_same",
            ("yes", "no"),
            ("Do the two pictures show the same shape?", "Is the shape in both images the same?"),
        ),
        TaskSpec(
            "video_check",
            ("yes", "no"),
            ("Is the {color} {shape} moving {direction}?", "Does the {color} {shape} move {direction}?"),
        ),
        TaskSpec(
            "speech_pair_second",
            SPEECH_WORDS,
            ("What is the second word?", "Which word is said second?"),
        ),
        TaskSpec(
            "audio_pair_second",
            SOUNDS,
            ("What is the second sound?", "Which sound comes second?"),
        ),
        TaskSpec(
            "audio_pair_same",
            ("yes", "no"),
            ("Are the two sounds of the same kind?", "Do you hear the same sound twice?"),
        ),
        TaskSpec(
            "cross_speech_video",
            ("yes", "no"),
            (
                "Does the spoken word name the moving shape?",
                "Is the shape in the video the one that is said?",
            ),
        ),
    )
}
ALL_TASKS: tuple[str, ...] = tuple(TASK_SPECS)
TASKS: tuple[str, ...] = ALL_TASKS[:7]  # the demo's tasks, the default of ``synthesize``
ABLATION_TASKS: tuple[str, ...] = (
    "image_pair_color",
    "image_pair_same",
    "video_check",
    "speech_pair_second",
    "audio_pair_same",
    "cross_speech_image",
    "cross_speech_video",
)

_MEDIA_LAYOUT: dict[str, tuple[str, str, Callable[[Path, np.ndarray], None]]] = {
    "image": ("img", ".png", write_png),
    "video": ("vid", ".mp4", write_mp4),
    "speech": ("speech", ".wav", write_wav),
    "audio": ("audio", ".wav", write_wav),
}


def _speech(word: str, rng: np.random.Generator, ctx: _Context) -> np.ndarray:
    """An augmented clip of ``word`` from the variants reserved for ``ctx.split``."""
    clips = load_speech_bank()[word]
    heldout = ctx.split == "heldout"
    variants = [v for v in range(len(clips)) if (v in HELDOUT_SPEECH_VARIANTS) == heldout]
    return augment_speech(clips[variants[rng.integers(len(variants))]], rng)


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One element of ``options``, uniformly."""
    return options[rng.integers(len(options))]


def _image(shape: str, color: str, rng: np.random.Generator, ctx: _Context) -> Media:
    return ("image", render_shape_image(shape, color, ctx.image_size, rng), f"a {color} {shape}")


def _video(shape: str, color: str, direction: str, rng: np.random.Generator, ctx: _Context) -> Media:
    frames = render_moving_shape(shape, color, direction, ctx.image_size, ctx.n_frames, rng)
    return ("video", frames, f"a {color} {shape} moving {direction}")


def _spoken(word: str, rng: np.random.Generator, ctx: _Context) -> Media:
    return ("speech", _speech(word, rng, ctx), f"the word {word}")


def _make_image_shape(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    return [_image(answer, _pick(tuple(COLORS), rng), rng, ctx)]


def _make_image_color(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    return [_image(_pick(SHAPES, rng), answer, rng, ctx)]


def _make_video_direction(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    return [_video(_pick(SHAPES, rng), _pick(tuple(COLORS), rng), answer, rng, ctx)]


def _make_video_color(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    return [_video(_pick(SHAPES, rng), answer, _pick(DIRECTIONS, rng), rng, ctx)]


def _make_speech_word(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    return [_spoken(answer, rng, ctx)]


def _make_audio_sound(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    return [("audio", render_sound(answer, rng), f"a {answer} sound")]


def _make_cross_speech_image(answer: str, rng: np.random.Generator, ctx: _Context) -> list[Media]:
    shape = _pick(SHAPES, rng)
    word = shape if answer == "yes" else _pick([s for s in SHAPES if s != shape], rng)
    return [_image(shape, _pick(tuple(COLORS), rng), rng, ctx), _spoken(word, rng, ctx)]


def _other(options: Sequence[str], than: str, rng: np.random.Generator) -> str:
    """One element of ``options`` other than ``than``, uniformly."""
    return _pick([o for o in options if o != than], rng)


def _make_image_pair_color(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    asked, other_shape = rng.permutation(SHAPES)[:2]
    other_color = _other(tuple(COLORS), answer, rng)
    pair = [_image(asked, answer, rng, ctx), _image(other_shape, other_color, rng, ctx)]
    if rng.random() < 0.5:
        pair.reverse()
    return pair, {"shape": asked}


def _make_image_pair_same(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    first = _pick(SHAPES, rng)
    second = first if answer == "yes" else _other(SHAPES, first, rng)
    colors = tuple(COLORS)
    return [_image(first, _pick(colors, rng), rng, ctx), _image(second, _pick(colors, rng), rng, ctx)]


def _make_video_check(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    truth = {
        "color": _pick(tuple(COLORS), rng),
        "shape": _pick(SHAPES, rng),
        "direction": _pick(DIRECTIONS, rng),
    }
    asked = dict(truth)
    if answer == "no":
        wrong = _pick(tuple(truth), rng)
        options = {"color": tuple(COLORS), "shape": SHAPES, "direction": DIRECTIONS}[wrong]
        asked[wrong] = _other(options, truth[wrong], rng)
    return [_video(truth["shape"], truth["color"], truth["direction"], rng, ctx)], asked


def _make_speech_pair_second(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    return [_spoken(_pick(SPEECH_WORDS, rng), rng, ctx), _spoken(answer, rng, ctx)]


def _make_audio_pair_second(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    first = _pick(SOUNDS, rng)
    return [
        ("audio", render_sound(first, rng), f"a {first} sound"),
        ("audio", render_sound(answer, rng), f"a {answer} sound"),
    ]


def _make_audio_pair_same(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    first = _pick(SOUNDS, rng)
    second = first if answer == "yes" else _other(SOUNDS, first, rng)
    return [("audio", render_sound(k, rng), f"a {k} sound") for k in (first, second)]


def _make_cross_speech_video(answer: str, rng: np.random.Generator, ctx: _Context) -> Made:
    shape = _pick(SHAPES, rng)
    word = shape if answer == "yes" else _other(SHAPES, shape, rng)
    clip = _video(shape, _pick(tuple(COLORS), rng), _pick(DIRECTIONS, rng), rng, ctx)
    return [clip, _spoken(word, rng, ctx)]


_MAKERS: dict[str, Callable[[str, np.random.Generator, _Context], Made]] = {
    "image_shape": _make_image_shape,
    "image_color": _make_image_color,
    "video_direction": _make_video_direction,
    "video_color": _make_video_color,
    "speech_word": _make_speech_word,
    "audio_sound": _make_audio_sound,
    "cross_speech_image": _make_cross_speech_image,
    "image_pair_color": _make_image_pair_color,
    "image_pair_same": _make_image_pair_same,
    "video_check": _make_video_check,
    "speech_pair_second": _make_speech_pair_second,
    "audio_pair_second": _make_audio_pair_second,
    "audio_pair_same": _make_audio_pair_same,
    "cross_speech_video": _make_cross_speech_video,
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


def _generate(out_dir: Path, task: str, n: int, seed: int, ctx: _Context) -> list[dict[str, Any]]:
    """``n`` records of ``task`` for ``ctx.split`` with balanced answers, media written to disk."""
    spec, make = TASK_SPECS[task], _MAKERS[task]
    rng = np.random.default_rng([seed, SPLITS.index(ctx.split), ALL_TASKS.index(task)])
    answers = rng.permutation(np.resize(np.arange(len(spec.choices)), n))
    records = []
    for i, a in enumerate(answers):
        answer = spec.choices[a]
        made = make(answer, rng, ctx)
        media, fields = made if isinstance(made, tuple) else (made, {})
        record_id = f"{ctx.split}-{task}-{i:05d}"
        question = _pick(spec.questions, rng).format(**fields)
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
        ctx = _Context(split=split, image_size=image_size, n_frames=n_frames)
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
    """A corpus disjoint from the instruction set (its own random stream) for encoder pre-training.

    Speech uses only the training voices, so held-out speech stays unheard.
    """
    rng = np.random.default_rng([seed, len(SPLITS), 0])
    ctx = _Context(split="train", image_size=image_size, n_frames=n_frames)
    stills = [_image(_pick(SHAPES, rng), _pick(tuple(COLORS), rng), rng, ctx) for _ in range(n_images)]
    moving = [
        _video(_pick(SHAPES, rng), _pick(tuple(COLORS), rng), _pick(DIRECTIONS, rng), rng, ctx)
        for _ in range(n_clips)
    ]
    transcripts = [_pick(SPEECH_WORDS, rng) for _ in range(n_speech)]
    speech = [_speech(word, rng, ctx) for word in transcripts]
    sound_labels = [int(rng.integers(len(SOUNDS))) for _ in range(n_sounds)]
    sounds = [render_sound(SOUNDS[k], rng) for k in sound_labels]
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

"""The synthetic tasks: what each asks, its closed answer set, and how its media are drawn.

A task maker turns an answer and a random stream into the media (with captions) that make the answer
right; ``unimoe.demo.synth`` writes them out as records.

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

Design choice:

- Speech is real synthetic speech: the package ships a bank of espeak-ng clips
  (``unimoe/assets/speech/{word}_{variant}.wav``, made by ``scripts/make_speech_bank.sh``), eight
  voice/speed/pitch variants per word. Training samples use variants 0-5 and held-out samples use
  variants 6-7 (``HELDOUT_SPEECH_VARIANTS``), so held-out accuracy measures generalisation to unseen
  voices. Every sample is further augmented (speed +-8%, gain, leading/trailing silence, noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .synth_media import (
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
)

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
class Context:
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


def speech_clip(word: str, rng: np.random.Generator, ctx: Context) -> np.ndarray:
    """An augmented clip of ``word`` from the variants reserved for ``ctx.split``."""
    clips = load_speech_bank()[word]
    heldout = ctx.split == "heldout"
    variants = [v for v in range(len(clips)) if (v in HELDOUT_SPEECH_VARIANTS) == heldout]
    return augment_speech(clips[variants[rng.integers(len(variants))]], rng)


def pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One element of ``options``, uniformly."""
    return options[rng.integers(len(options))]


def shape_image(shape: str, color: str, rng: np.random.Generator, ctx: Context) -> Media:
    return ("image", render_shape_image(shape, color, ctx.image_size, rng), f"a {color} {shape}")


def moving_clip(shape: str, color: str, direction: str, rng: np.random.Generator, ctx: Context) -> Media:
    frames = render_moving_shape(shape, color, direction, ctx.image_size, ctx.n_frames, rng)
    return ("video", frames, f"a {color} {shape} moving {direction}")


def _spoken(word: str, rng: np.random.Generator, ctx: Context) -> Media:
    return ("speech", speech_clip(word, rng, ctx), f"the word {word}")


def _make_image_shape(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    return [shape_image(answer, pick(tuple(COLORS), rng), rng, ctx)]


def _make_image_color(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    return [shape_image(pick(SHAPES, rng), answer, rng, ctx)]


def _make_video_direction(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    return [moving_clip(pick(SHAPES, rng), pick(tuple(COLORS), rng), answer, rng, ctx)]


def _make_video_color(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    return [moving_clip(pick(SHAPES, rng), answer, pick(DIRECTIONS, rng), rng, ctx)]


def _make_speech_word(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    return [_spoken(answer, rng, ctx)]


def _make_audio_sound(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    return [("audio", render_sound(answer, rng), f"a {answer} sound")]


def _make_cross_speech_image(answer: str, rng: np.random.Generator, ctx: Context) -> list[Media]:
    shape = pick(SHAPES, rng)
    word = shape if answer == "yes" else pick([s for s in SHAPES if s != shape], rng)
    return [shape_image(shape, pick(tuple(COLORS), rng), rng, ctx), _spoken(word, rng, ctx)]


def _other(options: Sequence[str], than: str, rng: np.random.Generator) -> str:
    """One element of ``options`` other than ``than``, uniformly."""
    return pick([o for o in options if o != than], rng)


def _make_image_pair_color(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    asked, other_shape = rng.permutation(SHAPES)[:2]
    other_color = _other(tuple(COLORS), answer, rng)
    pair = [shape_image(asked, answer, rng, ctx), shape_image(other_shape, other_color, rng, ctx)]
    if rng.random() < 0.5:
        pair.reverse()
    return pair, {"shape": asked}


def _make_image_pair_same(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    first = pick(SHAPES, rng)
    second = first if answer == "yes" else _other(SHAPES, first, rng)
    colors = tuple(COLORS)
    return [shape_image(first, pick(colors, rng), rng, ctx), shape_image(second, pick(colors, rng), rng, ctx)]


def _make_video_check(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    truth = {
        "color": pick(tuple(COLORS), rng),
        "shape": pick(SHAPES, rng),
        "direction": pick(DIRECTIONS, rng),
    }
    asked = dict(truth)
    if answer == "no":
        wrong = pick(tuple(truth), rng)
        options = {"color": tuple(COLORS), "shape": SHAPES, "direction": DIRECTIONS}[wrong]
        asked[wrong] = _other(options, truth[wrong], rng)
    return [moving_clip(truth["shape"], truth["color"], truth["direction"], rng, ctx)], asked


def _make_speech_pair_second(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    return [_spoken(pick(SPEECH_WORDS, rng), rng, ctx), _spoken(answer, rng, ctx)]


def _make_audio_pair_second(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    first = pick(SOUNDS, rng)
    return [
        ("audio", render_sound(first, rng), f"a {first} sound"),
        ("audio", render_sound(answer, rng), f"a {answer} sound"),
    ]


def _make_audio_pair_same(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    first = pick(SOUNDS, rng)
    second = first if answer == "yes" else _other(SOUNDS, first, rng)
    return [("audio", render_sound(k, rng), f"a {k} sound") for k in (first, second)]


def _make_cross_speech_video(answer: str, rng: np.random.Generator, ctx: Context) -> Made:
    shape = pick(SHAPES, rng)
    word = shape if answer == "yes" else _other(SHAPES, shape, rng)
    clip = moving_clip(shape, pick(tuple(COLORS), rng), pick(DIRECTIONS, rng), rng, ctx)
    return [clip, _spoken(word, rng, ctx)]


MAKERS: dict[str, Callable[[str, np.random.Generator, Context], Made]] = {
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

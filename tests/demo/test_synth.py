"""Tests for the synthetic instruction set: determinism, record validity, readable media, learnability."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from unimoe.demo.synth import synthesize
from unimoe.demo.synth_media import (
    DIRECTIONS,
    SAMPLE_RATE,
    SHAPES,
    SOUNDS,
    SPEECH_WORDS,
    load_speech_bank,
    render_moving_shape,
    render_sound,
)
from unimoe.demo.tasks import ABLATION_TASKS, HELDOUT_SPEECH_VARIANTS, TASK_SPECS, TASKS
from unimoe.errors import UniMoeInputError

N_TRAIN, N_HELDOUT, N_FRAMES = 6, 3, 8


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=1, n_train=N_TRAIN, n_heldout=N_HELDOUT, n_frames=N_FRAMES)
    return out


def _load(out: Path, split: str) -> list[dict]:
    return json.loads((out / f"{split}.json").read_text())


def _media_paths(record: dict) -> list[tuple[str, str]]:
    """(kind, path) of every media item of ``record``, in key order image, video, speech, audio."""
    items = []
    for kind in ("image", "video", "speech", "audio"):
        value = record.get(kind, [])
        items += [(kind, p) for p in ([value] if isinstance(value, str) else value)]
    return items


def _nearest_centroid_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Accuracy of a nearest-centroid classifier on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mu) / sd, (test_x - mu) / sd
    labels = np.unique(train_y)
    centroids = np.stack([train_x[train_y == c].mean(0) for c in labels])
    dist = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1)  # dist: [n_test, n_classes]
    return float((labels[dist.argmin(1)] == test_y).mean())


def test_same_seed_gives_identical_json_and_media(synth_dir: Path, tmp_path: Path) -> None:
    synthesize(tmp_path, seed=1, n_train=N_TRAIN, n_heldout=N_HELDOUT, n_frames=N_FRAMES)
    files = sorted(p.relative_to(synth_dir) for p in synth_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (synth_dir / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_training_split_does_not_depend_on_the_heldout_size(synth_dir: Path, tmp_path: Path) -> None:
    """A larger held-out split (``unimoe demo --n-heldout``) leaves the training records and media as
    they were: the same training, a more precise table."""
    synthesize(tmp_path, seed=1, n_train=N_TRAIN, n_heldout=N_HELDOUT + 4, n_frames=N_FRAMES)
    train = _load(synth_dir, "train")
    assert _load(tmp_path, "train") == train
    media = [
        v for r in train for value in r.values() for v in (value if isinstance(value, list) else [value])
    ]
    media = [v for v in media if isinstance(v, str) and v.startswith("media/")]
    assert len(media) >= len(train)
    for rel in media:
        assert (tmp_path / rel).read_bytes() == (synth_dir / rel).read_bytes(), rel
    assert len(_load(tmp_path, "heldout")) == len(_load(synth_dir, "heldout")) + 4 * len(TASKS)


def test_different_seed_and_task_subset(synth_dir: Path, tmp_path: Path) -> None:
    synthesize(tmp_path / "s2", seed=2, n_train=N_TRAIN, n_heldout=0, tasks=["image_shape"])
    other = (tmp_path / "s2" / "media/img/train-image_shape-00000.png").read_bytes()
    assert other != (synth_dir / "media/img/train-image_shape-00000.png").read_bytes()
    # a subset of tasks reproduces exactly the records those tasks get in the full set
    synthesize(tmp_path / "sub", seed=1, n_train=N_TRAIN, n_heldout=N_HELDOUT, tasks=["audio_sound"])
    full = [r for r in _load(synth_dir, "train") if r["task"] == "audio_sound"]
    assert _load(tmp_path / "sub", "train") == full
    rel = full[0]["audio"][0]
    assert (tmp_path / "sub" / rel).read_bytes() == (synth_dir / rel).read_bytes()


def test_records_are_valid(synth_dir: Path) -> None:
    for split, n in (("train", N_TRAIN), ("heldout", N_HELDOUT)):
        records = _load(synth_dir, split)
        assert Counter(r["task"] for r in records) == dict.fromkeys(TASKS, n)
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            human, gpt = r["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            assert gpt["value"] in r["choices"] == list(TASK_SPECS[r["task"]].choices)
            placeholders = re.findall(r"<(image|video|speech|audio)>", human["value"])
            media = _media_paths(r)
            assert placeholders == [kind for kind, _ in media], r["id"]
            assert media and all((synth_dir / p).is_file() for _, p in media), r["id"]
            assert len(r["captions"]) == len(media), r["id"]


def test_captions_describe_the_media(synth_dir: Path) -> None:
    for r in _load(synth_dir, "train"):
        answer, captions = r["conversations"][1]["value"], r["captions"]
        if r["task"] == "cross_speech_image":
            shape, word = captions[0].split()[-1], captions[1].split()[-1]
            assert (shape == word) == (answer == "yes"), r["id"]
        elif r["task"] == "audio_sound":
            assert captions == [f"a {answer} sound"]
        else:
            assert answer in captions[0].split(), r["id"]


@pytest.fixture(scope="module")
def ablation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ablation-suite")
    counts = {task: 4 + 2 * i for i, task in enumerate(ABLATION_TASKS)}
    counts["audio_pair_second"] = 4  # in the package, not in the suite
    synthesize(out, seed=0, n_train=counts, n_heldout=2, tasks=list(counts))
    return out


def test_ablation_suite_records_counts_and_media(ablation_dir: Path) -> None:
    records = _load(ablation_dir, "train")
    expected = {t: 4 + 2 * i for i, t in enumerate(ABLATION_TASKS)} | {"audio_pair_second": 4}
    assert Counter(r["task"] for r in records) == expected
    assert Counter(r["task"] for r in _load(ablation_dir, "heldout")) == dict.fromkeys(expected, 2)
    for r in records:
        human, gpt = r["conversations"]
        assert gpt["value"] in r["choices"] == list(TASK_SPECS[r["task"]].choices)
        assert "{" not in human["value"], r["id"]  # every question template filled
        media = _media_paths(r)
        assert re.findall(r"<(image|video|speech|audio)>", human["value"]) == [k for k, _ in media]
        assert all((ablation_dir / p).is_file() for _, p in media) and len(r["captions"]) == len(media)
    pairs = [r for r in records if r["task"] == "image_pair_color"]
    assert all(isinstance(r["image"], list) and len(r["image"]) == 2 for r in pairs)


def test_ablation_answers_follow_from_the_media(ablation_dir: Path) -> None:
    """Each answer checked against the captions (which are written from the same draws as the media)."""
    for r in _load(ablation_dir, "train") + _load(ablation_dir, "heldout"):
        question, answer = r["conversations"][0]["value"].split("\n")[-1], r["conversations"][1]["value"]
        words = [c.split() for c in r["captions"]]
        if r["task"] == "image_pair_color":  # "a {color} {shape}" twice, different shapes and colours
            (_, c1, s1), (_, c2, s2) = words
            assert s1 != s2 and c1 != c2
            asked = question.rstrip("?").split()[-1] if "have" not in question else question.split()[-2]
            assert answer == (c1 if asked == s1 else c2) and asked in (s1, s2), r["id"]
        elif r["task"] in ("image_pair_same", "audio_pair_same"):
            column = 2 if r["task"] == "image_pair_same" else 1  # "a {color} {shape}", "a {kind} sound"
            assert (words[0][column] == words[1][column]) == (answer == "yes"), r["id"]
        elif r["task"] == "video_check":  # "a {color} {shape} moving {direction}"
            _, color, shape, _, direction = words[0]
            wrong = [w for w in (color, shape, direction) if w not in question.rstrip("?").split()]
            assert len(wrong) == (0 if answer == "yes" else 1), (r["id"], question, r["captions"])
        elif r["task"] in ("speech_pair_second", "audio_pair_second"):
            assert answer == words[1][-1 if r["task"] == "speech_pair_second" else 1], r["id"]
        elif r["task"] in ("cross_speech_image", "cross_speech_video"):
            shape, word = words[0][2], words[1][-1]
            assert (shape == word) == (answer == "yes"), r["id"]


def test_ablation_counts_must_name_every_task(tmp_path: Path) -> None:
    with pytest.raises(UniMoeInputError, match="video_check"):
        synthesize(tmp_path, n_train={"image_pair_same": 2}, tasks=["image_pair_same", "video_check"])


def test_answers_are_balanced(tmp_path: Path) -> None:
    synthesize(tmp_path, seed=0, n_train=8, n_heldout=0, tasks=["cross_speech_image", "image_color"])
    counts = Counter((r["task"], r["conversations"][1]["value"]) for r in _load(tmp_path, "train"))
    assert counts[("cross_speech_image", "yes")] == counts[("cross_speech_image", "no")] == 4
    assert all(counts[("image_color", c)] == 2 for c in TASK_SPECS["image_color"].choices)


def test_summary_and_bad_arguments(tmp_path: Path) -> None:
    summary = synthesize(tmp_path, n_train=1, n_heldout=1, tasks=["speech_word", "image_shape"])
    assert list(summary) == ["speech_word", "image_shape"]
    assert summary["speech_word"]["chance"] == pytest.approx(1 / len(SPEECH_WORDS))
    assert summary["image_shape"] == {"train": 1, "heldout": 1, "choices": list(SHAPES), "chance": 0.25}
    with pytest.raises(UniMoeInputError, match="no_such_task"):
        synthesize(tmp_path, tasks=["no_such_task"])
    with pytest.raises(UniMoeInputError, match="image_size"):
        synthesize(tmp_path, image_size=33)


def test_media_are_readable(synth_dir: Path) -> None:
    for r in _load(synth_dir, "heldout"):
        for kind, rel in _media_paths(r):
            path = synth_dir / rel
            if kind == "image":
                with Image.open(path) as img:
                    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (32, 32))
            elif kind == "video":
                with av.open(str(path)) as container:
                    frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
                assert len(frames) == N_FRAMES and frames[0].shape == (32, 32, 3)
            else:
                info = sf.info(str(path))
                assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, "PCM_16")
                assert 0.3 < info.duration < 2.0


def test_video_direction_survives_mean_pooling() -> None:
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i in range(4 * 30):
        direction, shape = DIRECTIONS[i % 4], SHAPES[(i // 4) % 4]
        frames = render_moving_shape(shape, "red" if i % 3 else "blue", direction, 32, 16, rng)
        # mean over 8 evenly spaced frames, as a mean-pooling video model sees the clip
        mean = frames[np.linspace(0, 15, 8).round().astype(int)].astype(np.float32).mean(0).mean(-1)
        excess = np.abs(mean - mean[0, 0])  # [H, W]; the corner pixel is background
        xs.append(np.concatenate([excess.sum(0), excess.sum(1)]) / excess.sum())  # column, row profiles
        ys.append(i % 4)
    x, y = np.stack(xs), np.asarray(ys)
    assert _nearest_centroid_accuracy(x[:80], y[:80], x[80:], y[80:]) >= 0.9


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_mean_frame_peaks_on_the_destination_side(direction: str) -> None:
    rng = np.random.default_rng(3)
    for shape in SHAPES:
        for color in ("red", "blue"):
            frames = render_moving_shape(shape, color, direction, 32, 8, rng).astype(np.float32).mean(-1)
            excess = np.abs(frames - frames[0, 0, 0]).mean(0)  # [H, W]; the corner pixel is background
            # brightness profile along the motion: per column (left/right) or per row (up/down)
            profile = excess.sum(0 if direction in ("left", "right") else 1)
            sign = 1 if direction in ("right", "down") else -1
            assert sign * (profile.argmax() - 15.5) > 0, (shape, color, profile.argmax())


def _spectral_features(wav: np.ndarray) -> np.ndarray:
    """Time-mean and time-std of log energy in 8 linear frequency bands (25 ms frames)."""
    n = 400
    frames = wav[: len(wav) // n * n].reshape(-1, n) * np.hanning(n)  # [frames, 400]
    power = np.abs(np.fft.rfft(frames, axis=1))[:, :200] ** 2  # [frames, 200 bins]
    bands = np.log(power.reshape(len(power), 8, 25).sum(-1) + 1e-8)  # [frames, 8]
    return np.concatenate([bands.mean(0), bands.std(0)])


def test_audio_classes_are_spectrally_separable() -> None:
    rng = np.random.default_rng(0)
    labels = np.arange(5 * 30) % 5
    x = np.stack([_spectral_features(render_sound(SOUNDS[c], rng)) for c in labels])
    assert _nearest_centroid_accuracy(x[:100], labels[:100], x[100:], labels[100:]) >= 0.9


def test_speech_bank_has_every_word_and_variant() -> None:
    bank = load_speech_bank()
    assert set(bank) == set(SPEECH_WORDS) >= set(SHAPES)
    for word, clips in bank.items():
        assert len(clips) > max(HELDOUT_SPEECH_VARIANTS), word
        for clip in clips:
            assert clip.dtype == np.float32 and clip.ndim == 1
            assert 0.2 * SAMPLE_RATE < len(clip) < 1.5 * SAMPLE_RATE and np.abs(clip).max() > 0.5

"""Media primitives for the synthetic instruction set: shapes, moving-shape clips, sounds, speech.

Everything here is a pure function of its arguments and a ``numpy.random.Generator``; the writers
produce byte-identical files for identical inputs (PNG via Pillow, H.264/MPEG-4 mp4 via PyAV,
16 kHz mono PCM16 wav via soundfile).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr
from PIL import Image

SAMPLE_RATE = 16000
SHAPES = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 200, 45),
    "blue": (45, 75, 235),
    "yellow": (235, 220, 35),
}
DIRECTIONS = ("left", "right", "up", "down")
SOUNDS = ("hum", "beep", "chirp", "noise", "clicks")
SPEECH_WORDS = ("circle", "square", "triangle", "cross", "one", "two")

_SUPERSAMPLE = 3
_VIDEO_FPS = 8


def shape_coverage(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of ``shape`` centred at (cx, cy) with half-extent ``r`` (pixels).

    Returns a float32 array [size, size].
    """
    ss = _SUPERSAMPLE
    grid = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    dx = grid[None, :] - cx  # dx: [1, size*ss]
    dy = grid[:, None] - cy  # dy: [size*ss, 1]
    if shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif shape == "square":
        mask = np.maximum(np.abs(dx), np.abs(dy)) <= r
    elif shape == "triangle":
        top, bottom = -r, 0.8 * r
        half_width = r * (dy - top) / (bottom - top)
        mask = (dy >= top) & (dy <= bottom) & (np.abs(dx) <= half_width)
    elif shape == "cross":
        arm = 0.33 * r
        mask = ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dy) <= r) & (np.abs(dx) <= arm))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    # mask: [size*ss, size*ss] -> [size, ss, size, ss] -> mean over the sub-pixels
    return mask.reshape(size, ss, size, ss).mean(axis=(1, 3), dtype=np.float32)


def jittered_color(name: str, rng: np.random.Generator, jitter: int = 25) -> np.ndarray:
    """The RGB value of colour ``name`` with a small random per-channel offset, float32 [3]."""
    base = np.asarray(COLORS[name], dtype=np.float32)
    return np.clip(base + rng.integers(-jitter, jitter + 1, size=3), 0, 255).astype(np.float32)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A plain dark-grey canvas, float32 [size, size, 3]."""
    return np.full((size, size, 3), rng.uniform(10, 70), dtype=np.float32)


def render_shape_image(shape: str, color: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One solid ``shape`` of colour ``color`` with random size and position on a plain background.

    Returns uint8 [size, size, 3].
    """
    r = rng.uniform(0.28, 0.38) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
    cov = shape_coverage(shape, size, cx, cy, r)[..., None]  # [size, size, 1]
    img = _background(size, rng) * (1 - cov) + jittered_color(color, rng) * cov
    return np.round(img).astype(np.uint8)


def render_moving_shape(
    shape: str, color: str, direction: str, size: int, n_frames: int, rng: np.random.Generator
) -> np.ndarray:
    """A ``shape`` crossing the frame towards ``direction``, growing, brightening and leaving a trail.

    Growth (55% -> 100% of its size), brightening (30% -> 100% intensity) and a fading trail make
    every frame, and the mean of any evenly spaced subset of frames, asymmetric along the motion
    (dim and narrow behind, bright and wide ahead), so a model that mean-pools per-frame features
    can still tell the direction.
    Returns uint8 [n_frames, size, size, 3].
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    r_max = rng.uniform(0.15, 0.2) * size
    start, end = rng.uniform(0.16, 0.24) * size, rng.uniform(0.76, 0.84) * size
    if direction in ("left", "up"):
        start, end = size - start, size - end
    across = rng.uniform(0.35, 0.65) * size
    bg, rgb = _background(size, rng), jittered_color(color, rng)
    progress = np.linspace(0.0, 1.0, n_frames)
    covs, fills = [], []
    for s in progress:
        along = start + s * (end - start)
        cx, cy = (along, across) if direction in ("left", "right") else (across, along)
        covs.append(shape_coverage(shape, size, cx, cy, r_max * (0.55 + 0.45 * s))[..., None])
        fills.append((0.3 + 0.7 * s) * rgb + (0.7 - 0.7 * s) * bg)
    trail_decay = 0.5 ** (8.0 / n_frames)  # the trail fades by half every 1/8 of the crossing
    frames = np.empty((n_frames, size, size, 3), dtype=np.uint8)
    for t in range(n_frames):
        img = bg.copy()
        for past in range(t + 1):  # oldest first, so the current position is drawn on top
            alpha = covs[past] * trail_decay ** (t - past)
            img = img * (1 - alpha) + fills[past] * alpha
        frames[t] = np.round(img)
    return frames


def _fade(wav: np.ndarray, seconds: float = 0.01) -> np.ndarray:
    """``wav`` with linear fade-in/out ramps of ``seconds``."""
    n = min(int(seconds * SAMPLE_RATE), len(wav) // 2)
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    out = wav.copy()
    out[:n] *= ramp
    out[len(out) - n :] *= ramp[::-1]
    return out


def _click_train(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Short decaying noise bursts repeated ``rate`` times a second, float32 [n]."""
    click_len = int(0.004 * SAMPLE_RATE)
    click = rng.standard_normal(click_len) * np.exp(-np.arange(click_len) / (0.001 * SAMPLE_RATE))
    out = np.zeros(n, dtype=np.float32)
    for onset in np.arange(0, n - click_len, SAMPLE_RATE / rate).astype(int):
        out[onset : onset + click_len] += click
    return out


def render_sound(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A non-speech sound of class ``kind`` (see ``SOUNDS``), 0.5-1.5 s, random level and pitch.

    Returns float32 [samples] at ``SAMPLE_RATE``.
    """
    n = int(rng.uniform(0.5, 1.5) * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    jitter = rng.uniform(0.9, 1.1)
    if kind == "hum":
        f0 = 160.0 * jitter
        wav = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(4 * np.pi * f0 * t)
    elif kind == "beep":
        wav = np.sin(2 * np.pi * 2000.0 * jitter * t)
    elif kind == "chirp":
        f_lo, f_hi, dur = 500.0 * jitter, 1500.0 * jitter, n / SAMPLE_RATE
        k = np.log(f_hi / f_lo) / dur  # exponential sweep f(t) = f_lo * exp(k t)
        wav = np.sin(2 * np.pi * f_lo * (np.exp(k * t) - 1) / k)
    elif kind == "noise":
        wav = rng.standard_normal(n)
    elif kind == "clicks":
        wav = _click_train(n, 16.0 * jitter, rng)
    else:
        raise ValueError(f"unknown sound {kind!r}; expected one of {SOUNDS}")
    wav = _fade(wav.astype(np.float32))
    wav *= rng.uniform(0.2, 0.8) / max(float(np.abs(wav).max()), 1e-6)
    return wav + 0.003 * rng.standard_normal(n).astype(np.float32)


@functools.cache
def load_speech_bank() -> dict[str, tuple[np.ndarray, ...]]:
    """The packaged spoken-word clips: word -> clips ordered by variant, float32 at ``SAMPLE_RATE``."""
    from importlib.resources import files

    bank: dict[str, dict[int, np.ndarray]] = {}
    for entry in (files("unimoe") / "assets" / "speech").iterdir():
        if not entry.name.endswith(".wav"):
            continue
        word, variant = entry.name[: -len(".wav")].rsplit("_", 1)
        wav, sr = sf.read(io.BytesIO(entry.read_bytes()), dtype="float32")
        if sr != SAMPLE_RATE or wav.ndim != 1:
            raise ValueError(f"speech bank clip {entry.name} is not {SAMPLE_RATE} Hz mono")
        bank.setdefault(word, {})[int(variant)] = wav
    return {word: tuple(clips[v] for v in sorted(clips)) for word, clips in sorted(bank.items())}


def augment_speech(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``clip`` with a random speed change (+-8%), gain, leading/trailing silence and light noise."""
    speed = rng.uniform(0.92, 1.08)
    wav = soxr.resample(clip, SAMPLE_RATE, SAMPLE_RATE / speed).astype(np.float32)
    lead, trail = (rng.uniform(0.0, 0.25, size=2) * SAMPLE_RATE).astype(int)
    wav = np.concatenate([np.zeros(lead, np.float32), wav, np.zeros(trail, np.float32)])
    gain = rng.uniform(0.3, 1.0)
    noise = gain * rng.uniform(0.002, 0.01) * rng.standard_normal(len(wav)).astype(np.float32)
    return gain * wav + noise


def write_png(path: Path, image: np.ndarray) -> None:
    """Write uint8 [H, W, 3] ``image`` as PNG."""
    Image.fromarray(image, mode="RGB").save(path, format="PNG")


def write_wav(path: Path, wav: np.ndarray) -> None:
    """Write float ``wav`` as 16 kHz mono PCM16 (clipped to [-1, 1])."""
    sf.write(path, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")


@functools.cache
def _video_codec() -> str:
    """The best available encoder: libx264, else FFmpeg's native mpeg4."""
    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # PyAV raises different types across versions for a missing codec
        return "mpeg4"
    return "libx264"


def write_mp4(path: Path, frames: np.ndarray, fps: int = _VIDEO_FPS) -> None:
    """Write uint8 [T, H, W, 3] ``frames`` (H, W even) as a yuv420p mp4, byte-for-byte reproducibly.

    x264 runs at a constant quantiser: its default rate control (macroblock-tree) was seen to give
    run-to-run differences on frames this small.
    """
    _, height, width, _ = frames.shape
    codec = _video_codec()
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.codec_context.options = {"qp": "10", "preset": "fast"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

"""Loading images, audio and video into arrays the processors take.

Every loader raises `UniMoeInputError` naming the input when it is missing, empty, corrupt or in a
format that cannot be decoded.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr
from av.video.reformatter import VideoReformatter
from PIL import Image

from unimoe.errors import UniMoeInputError

PathLike = str | os.PathLike
ImageSource = PathLike | bytes | Image.Image | np.ndarray
AudioSource = PathLike | bytes | tuple[np.ndarray, int] | np.ndarray
VideoSource = PathLike | Sequence[PathLike | Image.Image]

# What PIL raises on undecodable data: OSError (incl. UnidentifiedImageError, truncated files),
# SyntaxError and ValueError from format plugins, EOFError on short reads.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _existing_file(src: PathLike, kind: str) -> Path:
    path = Path(src)
    if not path.is_file():
        raise UniMoeInputError(f"{kind} file not found: {path}")
    return path


def load_image(src: ImageSource) -> Image.Image:
    """An RGB image from a path, encoded bytes, a PIL image or an [H, W(, C)] uint8 array."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, np.ndarray):
        if (
            src.dtype != np.uint8
            or src.ndim not in (2, 3)
            or (src.ndim == 3 and src.shape[2] not in (1, 3, 4))
        ):
            raise UniMoeInputError(
                f"image array must be uint8 [H, W] or [H, W, 1|3|4], got {src.dtype} {src.shape}"
            )
        return Image.fromarray(src.squeeze(2) if src.ndim == 3 and src.shape[2] == 1 else src).convert("RGB")
    if isinstance(src, bytes):
        name, file = f"<{len(src)} bytes of image data>", io.BytesIO(src)
    else:
        path = _existing_file(src, "image")
        name, file = str(path), path
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except _PIL_ERRORS as exc:
        raise UniMoeInputError(f"cannot decode image {name}: {exc}") from exc


def _to_float(wave: np.ndarray) -> np.ndarray:
    if np.issubdtype(wave.dtype, np.integer):
        return wave.astype(np.float32) / float(np.iinfo(wave.dtype).max + 1)
    return wave.astype(np.float32, copy=False)


def _to_mono(wave: np.ndarray, name: str) -> np.ndarray:
    """[samples] or 2-D with channels on the shorter axis -> [samples]."""
    if wave.ndim == 1:
        return wave
    if wave.ndim != 2:
        raise UniMoeInputError(f"audio {name} must be 1-D or 2-D, got shape {wave.shape}")
    channel_axis = 0 if wave.shape[0] < wave.shape[1] else 1
    return wave.mean(axis=channel_axis)


def _decode_av_audio(container: av.container.InputContainer) -> tuple[np.ndarray, int] | None:
    """The first audio stream as float32 [samples, channels] and its rate; None without one."""
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="fltp")  # planar float32; layout and rate unchanged
    parts, rate = [], stream.rate
    for frame in container.decode(stream):
        rate = frame.sample_rate
        parts.extend(out.to_ndarray() for out in resampler.resample(frame))  # [channels, samples]
    parts.extend(out.to_ndarray() for out in resampler.resample(None))
    if not parts:
        return np.zeros((0, 1), dtype=np.float32), rate
    return np.concatenate(parts, axis=1).T, rate


def _wav_declared_frames(head: bytes) -> int | None:
    """The frames a RIFF/RIFX WAVE header's data chunk declares (None: not WAVE, or a streamed file
    whose size field is 0 or unset)."""
    if head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return None
    order = "<" if head[:4] == b"RIFF" else ">"
    block_align, pos = None, 12
    while pos + 8 <= len(head):
        chunk, size = head[pos : pos + 4], struct.unpack(order + "I", head[pos + 4 : pos + 8])[0]
        if chunk == b"fmt " and pos + 22 <= len(head):
            block_align = struct.unpack(order + "H", head[pos + 20 : pos + 22])[0]
        if chunk == b"data":
            if not block_align or size in (0, 0xFFFFFFFF):
                return None
            return size // block_align
        pos += 8 + size + (size & 1)
    return None


def _declared_frames(file: Path | io.BytesIO) -> int | None:
    """The frames an audio file's header promises, where libsndfile reads its format: a WAVE data
    chunk's size (libsndfile itself counts only the frames present), or the header's count (FLAC)."""
    try:
        info = sf.info(file)
    except (sf.SoundFileError, RuntimeError):
        return None
    finally:
        if isinstance(file, io.BytesIO):
            file.seek(0)
    if info.format in ("WAV", "WAVEX"):
        if isinstance(file, io.BytesIO):
            head = file.getvalue()[: 1 << 16]
        else:
            with open(file, "rb") as handle:
                head = handle.read(1 << 16)
        return _wav_declared_frames(head)
    return info.frames if info.frames > 0 else None


def _read_with_ffmpeg(file: Path | io.BytesIO, name: str) -> tuple[np.ndarray, int]:
    if isinstance(file, io.BytesIO):
        file.seek(0)
    try:
        with av.open(file if isinstance(file, io.BytesIO) else str(file)) as container:
            decoded = _decode_av_audio(container)
    except av.FFmpegError as exc:
        raise UniMoeInputError(f"cannot decode audio {name}: {exc}") from exc
    if decoded is None:
        raise UniMoeInputError(f"audio {name} has no audio stream")
    return decoded


def _read_audio_file(src: PathLike | bytes) -> tuple[np.ndarray, int, str]:
    """Decoded audio as float32 [samples, channels], its sampling rate and a name for messages. A file
    that holds fewer frames than its header declares (cut short) is refused."""
    if isinstance(src, bytes):
        name, file = f"<{len(src)} bytes of audio data>", io.BytesIO(src)
    else:
        path = _existing_file(src, "audio")
        name, file = str(path), path
    declared = _declared_frames(file)
    try:
        wave, rate = sf.read(file, dtype="float32", always_2d=True)
    except sf.SoundFileError:
        # not a format libsndfile reads (AAC, audio inside video containers, ...), or one it cannot
        # decode to the end: try FFmpeg
        wave, rate = _read_with_ffmpeg(file, name)
    if declared is not None and len(wave) < declared:
        raise UniMoeInputError(
            f"audio {name} is cut short: its header declares {declared} frames, it holds {len(wave)}"
        )
    return wave, rate, name


def _finish_audio(wave: np.ndarray, rate: int, sampling_rate: int, name: str) -> np.ndarray:
    wave = np.asarray(wave)
    if wave.size == 0:
        raise UniMoeInputError(f"audio {name} contains no samples")
    wave = _to_mono(_to_float(wave), name)
    if not np.all(np.isfinite(wave)):
        raise UniMoeInputError(f"audio {name} contains NaN or infinite samples")
    if rate != sampling_rate:
        wave = soxr.resample(wave, rate, sampling_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


def load_audio(src: AudioSource, sampling_rate: int = 16000) -> np.ndarray:
    """Mono float32 audio at `sampling_rate`.

    `src` is a path or encoded bytes (anything libsndfile or FFmpeg decodes, including the
    soundtrack of a video file), an `(array, rate)` pair, or an array already at `sampling_rate`.
    Arrays are [samples] or 2-D with channels on the shorter axis; integer arrays are scaled to
    [-1, 1). Channels are averaged. A PCM file cut short decodes to the samples it holds.
    """
    if isinstance(src, tuple):
        if len(src) != 2:
            raise UniMoeInputError("audio tuple must be (array, sampling_rate)")
        wave, rate = src
        return _finish_audio(np.asarray(wave), int(rate), sampling_rate, "<audio array>")
    if isinstance(src, np.ndarray):
        return _finish_audio(src, sampling_rate, sampling_rate, "<audio array>")
    wave, rate, name = _read_audio_file(src)
    return _finish_audio(wave, rate, sampling_rate, name)


def load_video_audio(path: PathLike, sampling_rate: int = 16000) -> np.ndarray | None:
    """The soundtrack of a video file as mono float32 at `sampling_rate`; None if it has none."""
    path = _existing_file(path, "video")
    try:
        with av.open(str(path)) as container:
            decoded = _decode_av_audio(container)
    except av.FFmpegError as exc:
        raise UniMoeInputError(f"cannot decode video {path}: {exc}") from exc
    if decoded is None:
        return None
    return _finish_audio(decoded[0], decoded[1], sampling_rate, str(path))


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """`num_frames` indices spread evenly over `total` frames, first and last included."""
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def _video_frame_count(path: Path) -> int:
    """Frames in the first video stream: the container's count, else one per demuxed packet."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise UniMoeInputError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _decode_frames(path: Path, wanted: np.ndarray) -> tuple[dict[int, Image.Image], int]:
    """The frames at indices `wanted` as RGB images, and how many frames were decoded to find them."""
    wanted_set, last = set(wanted.tolist()), int(wanted.max())
    picked: dict[int, Image.Image] = {}
    decoded = 0
    # one colour converter for the file's frames: `frame.to_image()` sets up a new one per frame,
    # which costs more than decoding a small frame (the same pixels, half the time on 32x32 clips)
    converter = VideoReformatter()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # one decoder thread: spawning FFmpeg's frame threads costs ~10x the decode of a short clip,
        # and data-loader workers already decode files in parallel
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if decoded in wanted_set:
                picked[decoded] = Image.fromarray(converter.reformat(frame, format="rgb24").to_ndarray())
            decoded += 1
            if decoded > last:
                break
    return picked, decoded


def load_video(src: VideoSource, num_frames: int = 8) -> list[Image.Image]:
    """`num_frames` RGB frames evenly spaced over a video file or a list of frame images.

    Only the chosen frames are kept in memory. Frames repeat when the video is shorter than
    `num_frames`.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if isinstance(src, (list, tuple)):
        if not src:
            raise UniMoeInputError("video frame list is empty")
        return [load_image(src[i]) for i in frame_indices(len(src), num_frames)]
    path = _existing_file(src, "video")
    try:
        total = _video_frame_count(path)
        wanted = frame_indices(max(total, 1), num_frames)
        picked, decoded = _decode_frames(path, wanted)
        if decoded == 0:
            raise UniMoeInputError(f"video {path} has no decodable frames")
        if decoded < total:  # the container lists frames that do not decode: cut short or corrupt
            raise UniMoeInputError(f"video {path} lists {total} frames but only {decoded} decode")
    except av.FFmpegError as exc:
        raise UniMoeInputError(f"cannot decode video {path}: {exc}") from exc
    return [picked[i] for i in wanted.tolist()]

import io

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from unimoe.errors import UniMoeInputError
from unimoe.processing import media
from unimoe.processing.media import frame_indices, load_audio, load_image, load_video, load_video_audio

SR = 16000
SPEECH_SAMPLES = 26239  # speech.wav: 1.64 s at 16 kHz


def luma(image: Image.Image) -> float:
    return float(np.asarray(image.convert("L"), dtype=np.float64).mean())


def gain_and_correlation(signal: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    n = min(len(signal), len(reference))
    signal, reference = signal[:n].astype(np.float64), reference[:n].astype(np.float64)
    return float(signal @ reference / (reference @ reference)), float(np.corrcoef(signal, reference)[0, 1])


# ---- images


def test_load_image_reads_the_real_photo(fixtures_dir):
    image = load_image(fixtures_dir / "photo.jpg")
    assert image.mode == "RGB" and image.size == (128, 128)
    pixels = np.asarray(image)
    assert pixels.std() > 30  # a real photo, not a flat or blank image
    assert load_image(str(fixtures_dir / "photo.jpg")).tobytes() == image.tobytes()


def test_load_image_from_bytes_pil_and_arrays(fixtures_dir):
    reference = load_image(fixtures_dir / "photo.jpg")
    assert load_image((fixtures_dir / "photo.jpg").read_bytes()).tobytes() == reference.tobytes()

    rgba = reference.convert("RGBA")
    assert load_image(rgba).mode == "RGB"
    assert load_image(rgba).tobytes() == reference.tobytes()

    pixels = np.asarray(reference)
    np.testing.assert_array_equal(np.asarray(load_image(pixels)), pixels)
    gray = pixels[..., 0].copy()
    np.testing.assert_array_equal(np.asarray(load_image(gray))[..., 2], gray)
    np.testing.assert_array_equal(np.asarray(load_image(gray[..., None]))[..., 1], gray)


@pytest.mark.parametrize(
    "array", [np.zeros((4, 4, 3), dtype=np.float32), np.zeros((4, 4, 2), dtype=np.uint8)]
)
def test_load_image_rejects_bad_arrays(array):
    with pytest.raises(UniMoeInputError, match="image array"):
        load_image(array)


# ---- audio


def test_load_audio_reads_the_speech_wav(fixtures_dir):
    wave = load_audio(fixtures_dir / "speech.wav")
    assert wave.dtype == np.float32 and wave.shape == (SPEECH_SAMPLES,)
    assert 0.3 < np.abs(wave).max() <= 1.0
    np.testing.assert_array_equal(load_audio((fixtures_dir / "speech.wav").read_bytes()), wave)


def test_load_audio_resamples_and_mixes_44k_stereo(fixtures_dir):
    raw, raw_rate = sf.read(fixtures_dir / "speech_44k_stereo.flac")
    assert raw.shape[1] == 2 and raw_rate == 44100
    wave = load_audio(fixtures_dir / "speech_44k_stereo.flac")
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - len(raw) * SR / 44100) <= 1
    # The file holds the sentence at full level on the left and half level on the right: the
    # channel mean is 0.75 x the 16 kHz mono version (taking one channel would give 1.0 or 0.5).
    gain, correlation = gain_and_correlation(wave, load_audio(fixtures_dir / "speech.wav"))
    assert gain == pytest.approx(0.75, abs=0.01)
    assert correlation > 0.999


def test_load_audio_falls_back_to_ffmpeg_for_aac(fixtures_dir):
    wave = load_audio(fixtures_dir / "audio_only.m4a")
    assert abs(len(wave) - SPEECH_SAMPLES) <= 1024  # AAC pads to whole 1024-sample frames
    gain, correlation = gain_and_correlation(wave, load_audio(fixtures_dir / "speech.wav"))
    assert gain == pytest.approx(1.0, abs=0.05) and correlation > 0.99
    np.testing.assert_array_equal(load_audio((fixtures_dir / "audio_only.m4a").read_bytes()), wave)


def test_load_audio_reads_a_video_soundtrack(fixtures_dir):
    wave = load_audio(fixtures_dir / "clip.mp4")
    assert len(wave) == pytest.approx(2 * SR, abs=1024)
    np.testing.assert_array_equal(wave, load_video_audio(fixtures_dir / "clip.mp4"))
    _, correlation = gain_and_correlation(wave, load_audio(fixtures_dir / "speech.wav"))
    assert correlation > 0.99


def test_load_audio_from_arrays(fixtures_dir):
    speech = load_audio(fixtures_dir / "speech.wav")
    np.testing.assert_array_equal(load_audio(speech), speech)

    at_44k = load_audio((speech, SR), sampling_rate=44100)
    assert abs(len(at_44k) - len(speech) * 44100 / SR) <= 1
    back = load_audio((at_44k, 44100))
    assert gain_and_correlation(back, speech)[1] > 0.999

    stereo = np.stack([speech, np.zeros_like(speech)])  # [channels, samples]
    np.testing.assert_allclose(load_audio(stereo), speech / 2)
    np.testing.assert_allclose(load_audio(stereo.T.copy()), speech / 2)  # [samples, channels]

    pcm = np.array([0, 16384, -32768], dtype=np.int16)
    np.testing.assert_array_equal(load_audio(pcm), np.array([0.0, 0.5, -1.0], dtype=np.float32))


def test_load_audio_rejects_empty_audio(tmp_path):
    with pytest.raises(UniMoeInputError, match="no samples"):
        load_audio(np.zeros(0, dtype=np.float32))
    silent = tmp_path / "no_samples.wav"
    sf.write(silent, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(UniMoeInputError, match="no_samples.wav"):
        load_audio(silent)
    with pytest.raises(UniMoeInputError, match="NaN"):
        load_audio(np.array([0.0, np.nan], dtype=np.float32))


# ---- video


def test_load_video_picks_evenly_spaced_frames(fixtures_dir):
    # clip.mp4 has 20 frames; frame k is flat grey with luma 16 + 10 k, i.e. RGB level ~11.64 k.
    frames = load_video(fixtures_dir / "clip.mp4", num_frames=8)
    assert len(frames) == 8 and all(f.mode == "RGB" and f.size == (64, 64) for f in frames)
    expected = frame_indices(20, 8)
    assert expected.tolist() == [0, 3, 5, 8, 11, 14, 16, 19]
    np.testing.assert_allclose([luma(f) for f in frames], expected * 255 / 219 * 10, atol=2.0)


def test_load_video_frames_equal_pyav_own_conversion(tmp_path):
    """Colourful frames come out exactly as PyAV's per-frame ``to_image()`` gives them."""
    rng = np.random.default_rng(0)
    path = tmp_path / "noise.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for _ in range(12):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(path)) as container:
        reference = [frame.to_image() for frame in container.decode(video=0)]
    frames = load_video(path, num_frames=5)
    wanted = frame_indices(len(reference), 5)
    assert len(set(wanted.tolist())) == 5
    for frame, index in zip(frames, wanted):
        assert frame.mode == "RGB" and frame.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(frame), np.asarray(reference[index]))
    assert np.asarray(frames[0]).std() > 20  # not flat: the colour conversion is exercised


def test_load_video_repeats_frames_of_short_videos(fixtures_dir):
    frames = load_video(fixtures_dir / "clip_noaudio.mp4", num_frames=30)
    levels = np.round(np.array([luma(f) for f in frames]) / (255 / 219 * 10))
    assert len(frames) == 30 and levels[0] == 0 and levels[-1] == 19
    assert (np.diff(levels) >= 0).all() and len(set(levels.tolist())) == 20


def test_load_video_without_frame_count_in_container(fixtures_dir, tmp_path):
    # Matroska stores no frame count: frames are counted by demuxing before decoding.
    remuxed = tmp_path / "clip.mkv"
    with av.open(str(fixtures_dir / "clip.mp4")) as source, av.open(str(remuxed), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    with av.open(str(remuxed)) as container:
        assert container.streams.video[0].frames == 0
    expected = [luma(f) for f in load_video(fixtures_dir / "clip.mp4")]
    np.testing.assert_allclose([luma(f) for f in load_video(remuxed)], expected, atol=0.5)


def test_video_whose_listed_frames_do_not_decode_is_refused(fixtures_dir, monkeypatch):
    monkeypatch.setattr(media, "_video_frame_count", lambda path: 40)  # 20 frames decode
    with pytest.raises(UniMoeInputError, match="clip.mp4 lists 40 frames but only 20 decode"):
        load_video(fixtures_dir / "clip.mp4", num_frames=8)


def test_mp4_cut_short_is_refused(fixtures_dir, tmp_path):
    # moov (the frame list) first, then the data cut: the last frames cannot be decoded
    fast = tmp_path / "fast.mp4"
    with (
        av.open(str(fixtures_dir / "clip_noaudio.mp4")) as source,
        av.open(str(fast), "w", options={"movflags": "faststart"}) as target,
    ):
        stream = target.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                target.mux(packet)
    data = fast.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.95)])
    with pytest.raises(UniMoeInputError, match="cut.mp4"):
        load_video(cut)


def test_load_video_from_a_frame_list(fixtures_dir, tmp_path):
    paths = []
    for k in range(10):
        path = tmp_path / f"frame_{k}.png"
        Image.new("RGB", (8, 8), (k * 20, 0, 0)).save(path)
        paths.append(path)
    frames = load_video(paths, num_frames=4)
    assert [np.asarray(f)[0, 0, 0] for f in frames] == [0, 60, 120, 180]
    images = [Image.new("L", (8, 8), k) for k in range(3)]
    assert [np.asarray(f)[0, 0, 1] for f in load_video(images, num_frames=8)] == [0, 0, 1, 1, 1, 1, 2, 2]


def test_load_video_audio(fixtures_dir):
    assert load_video_audio(fixtures_dir / "clip_noaudio.mp4") is None
    wave = load_video_audio(fixtures_dir / "clip.mp4", sampling_rate=8000)
    assert wave.dtype == np.float32 and len(wave) == pytest.approx(2 * 8000, abs=512)


# ---- bad inputs: every loader names the file


def _corrupt(path, fixtures_dir):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _empty(path, fixtures_dir):
    path.write_bytes(b"")


def _truncated(path, fixtures_dir):
    source = {".jpg": "photo.jpg", ".wav": "speech.wav", ".mp4": "clip.mp4"}[path.suffix]
    data = (fixtures_dir / source).read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _unknown_format(path, fixtures_dir):
    path.write_text("this is a text file, not media\n" * 20)


LOADERS = {".jpg": load_image, ".wav": load_audio, ".mp4": load_video}


BAD_FILES = [
    (make, suffix) for make in (_corrupt, _empty, _truncated, _unknown_format) for suffix in sorted(LOADERS)
]


@pytest.mark.parametrize(("make", "suffix"), BAD_FILES)
def test_bad_files_raise_input_error_naming_the_file(tmp_path, fixtures_dir, suffix, make):
    path = tmp_path / f"bad_{make.__name__.strip('_')}{suffix}"
    make(path, fixtures_dir)
    with pytest.raises(UniMoeInputError, match=path.name):
        LOADERS[suffix](path)


@pytest.mark.parametrize("name", ["speech_44k_stereo.flac", "audio_only.m4a", "clip.mp4"])
def test_truncated_compressed_audio_raises_input_error(tmp_path, fixtures_dir, name):
    data = (fixtures_dir / name).read_bytes()
    path = tmp_path / f"cut_{name}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UniMoeInputError, match=path.name):
        load_audio(path)


def test_wav_cut_short_is_refused(tmp_path, fixtures_dir):
    # libsndfile returns the samples present; the data chunk's size says how many there should be
    data = (fixtures_dir / "speech.wav").read_bytes()
    declared = len(load_audio(fixtures_dir / "speech.wav"))
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: 44 + 2 * 8000])  # the header and the first 8000 samples
    with pytest.raises(
        UniMoeInputError, match=f"cut.wav is cut short: its header declares {declared} frames, it holds 8000"
    ):
        load_audio(path)
    with pytest.raises(UniMoeInputError, match="bytes of audio data> is cut short"):
        load_audio(path.read_bytes())


def test_wav_with_unset_or_generous_sizes_loads(tmp_path, fixtures_dir):
    data = bytearray((fixtures_dir / "speech.wav").read_bytes())
    full = load_audio(fixtures_dir / "speech.wav")
    assert data[36:40] == b"data"
    streamed = bytearray(data)
    streamed[40:44] = (0xFFFFFFFF).to_bytes(4, "little")  # a streamed file: size unknown
    (tmp_path / "streamed.wav").write_bytes(streamed)
    np.testing.assert_array_equal(load_audio(tmp_path / "streamed.wav"), full)
    (tmp_path / "padded.wav").write_bytes(bytes(data) + b"\0" * 64)  # bytes after the data chunk
    np.testing.assert_array_equal(load_audio(tmp_path / "padded.wav"), full)


@pytest.mark.parametrize("loader", [load_image, load_audio, load_video, load_video_audio])
def test_missing_files_raise_input_error_naming_the_file(tmp_path, loader):
    with pytest.raises(UniMoeInputError, match="not_there.bin"):
        loader(tmp_path / "not_there.bin")


def test_video_without_video_stream(fixtures_dir):
    with pytest.raises(UniMoeInputError, match="audio_only.m4a.*no video stream"):
        load_video(fixtures_dir / "audio_only.m4a")


def test_bytes_that_are_not_media_raise_input_error():
    with pytest.raises(UniMoeInputError, match="bytes of image data"):
        load_image(b"not an image")
    with pytest.raises(UniMoeInputError, match="bytes of audio data"):
        load_audio(io.BytesIO(b"x").getvalue() * 100)

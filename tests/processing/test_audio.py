import math

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor

from unimoe.errors import UniMoeInputError
from unimoe.processing.audio import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    beats_fbank,
    chunk_audio,
    default_whisper_feature_extractor,
    kaldi_fbank,
    whisper_features,
)
from unimoe.processing.media import load_audio

SR = 16000
LOG_EPS = math.log(torch.finfo(torch.float32).eps)

# Both sides compute in float32 with different FFTs and op orders. Where a mel bin is within
# 15 nats (65 dB) of its frame's strongest bin, the measured gap is at most 6e-4 (natural-log units;
# on the narrow low-frequency triangles of 128 bins at 50 ms, which cover one or two FFT bins) and
# below 1e-4 elsewhere. Bins much deeper than that, such as the far side of a pure tone in sound.wav,
# sit at the float32 round-off floor of the FFT (~32 nats below the peak) and differ by up to 0.5
# between any two float32 implementations, so they are only checked to be deep on both sides.
# A wrong window, pre-emphasis, DC removal, mel scale or FFT size moves values by 1e-2 to 1e+1.
KNF_ATOL = 1e-3
KNF_DYNAMIC_RANGE = 15.0


def knf_fbank(wave: np.ndarray, num_bins: int, frame_length_ms: float = 25.0) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = frame_length_ms
    opts.mel_opts.num_bins = num_bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SR, wave.tolist())
    fbank.input_finished()
    return np.stack([np.asarray(fbank.get_frame(i)) for i in range(fbank.num_frames_ready)])


def assert_close_to_knf(ours: torch.Tensor, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    ours = ours.numpy()
    floor = reference.max(axis=1, keepdims=True) - KNF_DYNAMIC_RANGE  # [frames, 1]
    strong = reference >= floor
    assert strong.mean() > 0.25  # a pure tone leaves about a third of its bins within range
    np.testing.assert_allclose(ours[strong], reference[strong], atol=KNF_ATOL, rtol=0)
    assert (ours[~strong] < floor.repeat(reference.shape[1], axis=1)[~strong] + 1.0).all()


@pytest.fixture
def speech(fixtures_dir) -> np.ndarray:
    return load_audio(fixtures_dir / "speech.wav")


@pytest.mark.parametrize(("num_bins", "frame_length_ms"), [(23, 25.0), (80, 25.0), (128, 50.0)])
def test_kaldi_fbank_matches_kaldi_native_fbank_on_noise(num_bins, frame_length_ms):
    wave = (np.random.default_rng(0).standard_normal(SR) * 3000).astype(np.float32)
    ours = kaldi_fbank(torch.from_numpy(wave), num_mel_bins=num_bins, frame_length_ms=frame_length_ms)
    reference = knf_fbank(wave, num_bins, frame_length_ms)
    assert_close_to_knf(ours, reference)


@pytest.mark.parametrize("name", ["speech.wav", "sound.wav"])
@pytest.mark.parametrize(("num_bins", "frame_length_ms"), [(80, 25.0), (128, 50.0)])
def test_kaldi_fbank_matches_kaldi_native_fbank_on_real_audio(fixtures_dir, name, num_bins, frame_length_ms):
    wave = load_audio(fixtures_dir / name) * 2**15
    ours = kaldi_fbank(torch.from_numpy(wave), num_mel_bins=num_bins, frame_length_ms=frame_length_ms)
    reference = knf_fbank(wave, num_bins, frame_length_ms)
    num_frames = 1 + (len(wave) - int(SR * frame_length_ms / 1000)) // 160
    assert ours.shape == (num_frames, num_bins)
    assert_close_to_knf(ours, reference)


def test_kaldi_fbank_128_bins_at_25ms_has_kaldis_empty_filter():
    # Kaldi itself refuses 128 bins with a 512-point FFT because some triangles hold no FFT bin;
    # torchaudio (and so BEATs) keeps them as all-zero filters whose log energy is log(eps).
    def mel(f):
        return 1127.0 * math.log(1.0 + f / 700.0)

    low, high = mel(20.0), mel(8000.0)
    delta = (high - low) / 129
    fft_mels = [mel(k * SR / 512) for k in range(256)]
    empty = [b for b in range(128) if not any(low + b * delta < m < low + (b + 2) * delta for m in fft_mels)]
    assert empty  # the check below would be vacuous otherwise

    wave = torch.from_numpy(np.random.default_rng(1).standard_normal(30 * SR).astype(np.float32)) * 3000
    fbank = kaldi_fbank(wave)
    assert fbank.shape == (2998, 128)
    is_floor = (fbank == LOG_EPS).all(dim=0)
    assert is_floor.nonzero().flatten().tolist() == empty
    assert (fbank[:, ~is_floor] > 0).all()


def test_kaldi_fbank_batch_equals_single(speech):
    waves = torch.from_numpy(np.stack([speech, speech[::-1].copy()])) * 2**15
    batched = kaldi_fbank(waves)
    torch.testing.assert_close(batched[0], kaldi_fbank(waves[0]))
    torch.testing.assert_close(batched[1], kaldi_fbank(waves[1]))


def test_kaldi_fbank_rejects_audio_shorter_than_a_frame():
    with pytest.raises(UniMoeInputError, match="shorter than one"):
        kaldi_fbank(torch.zeros(399))


@pytest.mark.parametrize(
    ("seconds", "expected_lengths"),
    [(1.0, [SR]), (30.0, [30 * SR]), (61.0, [30 * SR, 30 * SR, SR]), (30.0 + 1 / SR, [30 * SR, 1])],
)
def test_chunk_audio_lengths(seconds, expected_lengths):
    wave = np.arange(round(seconds * SR), dtype=np.float32)
    chunks = chunk_audio(wave)
    assert [len(c) for c in chunks] == expected_lengths
    np.testing.assert_array_equal(np.concatenate(chunks), wave)


def test_release_speech_chunking_skips_one_sample_per_chunk():
    wave = np.arange(16000 * 65, dtype=np.float32)  # 65 s: chunks start at 0, 480001, 960002
    chunks = chunk_audio(wave, 16000, 30.0, None, skip=1)
    assert [c[0] for c in chunks] == [0, 480001, 960002]
    assert [c.size for c in chunks] == [480000, 480000, 16000 * 65 - 960002]
    assert [c[0] for c in chunk_audio(wave, 16000, 30.0, None)] == [0, 480000, 960000]


def test_chunk_audio_caps_the_number_of_chunks():
    wave = np.zeros(25 * 60 * SR, dtype=np.float32)
    assert len(chunk_audio(wave)) == 20
    assert len(chunk_audio(wave, max_chunks=3)) == 3
    assert len(chunk_audio(wave, max_chunks=None)) == 50


@pytest.mark.parametrize("wave", [np.zeros(0, dtype=np.float32), np.zeros((2, 100), dtype=np.float32)])
def test_chunk_audio_rejects_empty_or_multichannel(wave):
    with pytest.raises(UniMoeInputError):
        chunk_audio(wave)


def test_beats_fbank_shapes_padding_and_normalisation(speech):
    full = np.random.default_rng(2).uniform(-0.5, 0.5, 30 * SR).astype(np.float32)
    short = speech.copy()
    short[-1] = 0.25  # a non-zero last sample, so repeating it differs from zero padding
    fbank, mask = beats_fbank([full, short])

    assert fbank.shape == (2, 2998, 128) and fbank.dtype == torch.float32
    assert mask.shape == (2, 2998) and mask.dtype == torch.bool
    assert not mask[0].any()
    first_padded = math.ceil(len(short) / 160)  # frames whose first 10 ms hop is all padding
    assert not mask[1, :first_padded].any() and mask[1, first_padded:].all()

    padded = np.concatenate([short, np.full(30 * SR - len(short), short[-1], dtype=np.float32)])
    for row, wave in enumerate([full, padded]):
        raw = kaldi_fbank(torch.from_numpy(wave) * 32768.0, num_mel_bins=128)
        torch.testing.assert_close(fbank[row], (raw - 15.41663) / (2 * 6.55582))
    assert (BEATS_FBANK_MEAN, BEATS_FBANK_STD) == (15.41663, 6.55582)

    zero_padded = np.pad(short, (0, 30 * SR - len(short)))
    zero_fbank = (kaldi_fbank(torch.from_numpy(zero_padded) * 32768.0) - BEATS_FBANK_MEAN) / (
        2 * BEATS_FBANK_STD
    )
    assert not torch.allclose(fbank[1], zero_fbank)
    # Frames wholly inside the constant padding have zero energy after DC removal.
    torch.testing.assert_close(
        fbank[1, first_padded + 3 :],
        torch.full_like(fbank[1, first_padded + 3 :], (LOG_EPS - 15.41663) / 13.11164),
    )


@pytest.mark.parametrize(
    "chunks", [[], [np.zeros(0, dtype=np.float32)], [np.zeros(30 * SR + 1, dtype=np.float32)]]
)
def test_beats_fbank_rejects_bad_chunks(chunks):
    with pytest.raises(UniMoeInputError):
        beats_fbank(chunks)


def test_whisper_features_equal_the_transformers_extractor(speech):
    extractor = default_whisper_feature_extractor()
    noise = np.random.default_rng(3).uniform(-0.3, 0.3, 30 * SR).astype(np.float32)
    chunks = chunk_audio(np.concatenate([noise, speech]))
    features = whisper_features(chunks, extractor)
    assert features.shape == (2, 80, 3000)
    for i, chunk in enumerate(chunks):
        direct = extractor(chunk, sampling_rate=SR, return_tensors="pt").input_features
        torch.testing.assert_close(features[i : i + 1], direct)
    # Speech is 1.6 s of the 30 s window: the padded tail is flat, the speech is not.
    assert features[1, :, 300:].std() < 1e-6 < features[1, :, :150].std()


def test_default_whisper_feature_extractor_is_whisper_small():
    extractor = default_whisper_feature_extractor()
    assert (extractor.feature_size, extractor.sampling_rate, extractor.hop_length) == (80, 16000, 160)
    assert (extractor.n_fft, extractor.n_samples, extractor.nb_max_frames) == (400, 480000, 3000)
    np.testing.assert_array_equal(extractor.mel_filters, WhisperFeatureExtractor().mel_filters)


def test_whisper_features_reject_chunks_over_30_seconds():
    with pytest.raises(UniMoeInputError, match="longer than"):
        whisper_features([np.zeros(30 * SR + 1, dtype=np.float32)], default_whisper_feature_extractor())

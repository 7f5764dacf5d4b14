"""Audio features for the speech (Whisper) and audio (BEATs) encoders.

Long audio is cut into 30 s chunks that are encoded separately. The speech branch uses Whisper's
80-bin log-mel features; the audio branch uses Kaldi-compatible 128-bin log-mel filter banks,
normalised with the BEATs training statistics.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import WhisperFeatureExtractor

from unimoe.errors import UniMoeInputError

BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582


def chunk_audio(
    wave: np.ndarray,
    sampling_rate: int = 16000,
    chunk_seconds: float = 30.0,
    max_chunks: int | None = 20,
    skip: int = 0,
) -> list[np.ndarray]:
    """Split a mono waveform into consecutive chunks of `chunk_seconds`.

    The last chunk is shorter (not padded). At most `max_chunks` chunks are returned (audio after
    them is dropped); `None` means no limit. `skip` samples after each chunk are left out: the release
    cuts speech into pieces one sample longer than 30 s and keeps the first 30 s of each (`skip=1`).
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise UniMoeInputError(f"audio waveform must be 1-D (mono), got shape {wave.shape}")
    if wave.size == 0:
        raise UniMoeInputError("audio waveform is empty")
    chunk_len = int(round(chunk_seconds * sampling_rate))
    chunks = [wave[start : start + chunk_len] for start in range(0, wave.size, chunk_len + skip)]
    return chunks if max_chunks is None else chunks[:max_chunks]


def _kaldi_mel_banks(
    num_bins: int, fft_size: int, sample_frequency: float, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Triangular filters on Kaldi's mel scale (1127 ln(1 + f/700)): [num_bins, fft_size // 2 + 1]."""
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist

    def mel(freq: torch.Tensor) -> torch.Tensor:
        return 1127.0 * torch.log1p(freq / 700.0)

    mel_low, mel_high = (
        mel(torch.tensor(low_freq, dtype=torch.float64)),
        mel(torch.tensor(high_freq, dtype=torch.float64)),
    )
    delta = (mel_high - mel_low) / (num_bins + 1)
    edges = mel_low + delta * torch.arange(num_bins + 2, dtype=torch.float64)  # [num_bins + 2]
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [num_bins, 1] each
    # Kaldi ignores the Nyquist bin; it gets a zero weight.
    fft_mel = mel(sample_frequency / fft_size * torch.arange(fft_size // 2, dtype=torch.float64))
    up = (fft_mel - left) / (center - left)
    down = (right - fft_mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # [num_bins, fft_size // 2]
    return torch.nn.functional.pad(banks, (0, 1))


def kaldi_fbank(
    waveform: torch.Tensor,
    num_mel_bins: int = 128,
    sample_frequency: float = 16000,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    preemphasis: float = 0.97,
) -> torch.Tensor:
    """Kaldi log-mel filter bank features: `compute-fbank-feats` with Kaldi's defaults, without dither.

    Matches `torchaudio.compliance.kaldi.fbank` with dither 0: povey window, DC offset removal,
    pre-emphasis, edges snipped, power spectrum (FFT size rounded up to a power of two), log with
    a floor of float32 epsilon. `waveform`: [samples] or [batch, samples] in the caller's scale
    (Kaldi expects 16-bit integer range). Returns [frames, num_mel_bins] or [batch, frames,
    num_mel_bins] in the waveform's dtype.
    """
    window_size = int(sample_frequency * frame_length_ms / 1000)
    window_shift = int(sample_frequency * frame_shift_ms / 1000)
    if waveform.shape[-1] < window_size:
        raise UniMoeInputError(
            f"audio of {waveform.shape[-1]} samples is shorter than one {frame_length_ms} ms frame"
        )
    fft_size = 1 << (window_size - 1).bit_length()
    frames = waveform.unfold(-1, window_size, window_shift)  # [..., num_frames, window_size]
    frames = frames - frames.mean(dim=-1, keepdim=True)
    previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)  # x[n - 1], with x[-1] = x[0]
    frames = frames - preemphasis * previous
    window = torch.hann_window(window_size, periodic=False, dtype=frames.dtype).pow(0.85)
    spectrum = torch.fft.rfft(frames * window, n=fft_size).abs().pow(2)  # [..., num_frames, fft_size//2+1]
    banks = _kaldi_mel_banks(num_mel_bins, fft_size, sample_frequency, low_freq, high_freq)
    mel_energies = spectrum @ banks.to(spectrum.dtype).T  # [..., num_frames, num_mel_bins]
    return mel_energies.clamp_min(torch.finfo(torch.float32).eps).log()


def beats_fbank(
    chunks: list[np.ndarray],
    sampling_rate: int = 16000,
    chunk_seconds: float = 30.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BEATs input features for a batch of audio chunks.

    Each chunk is padded to `chunk_seconds` by repeating its last sample, scaled to 16-bit range,
    turned into 128-bin Kaldi fbank and normalised with the BEATs statistics. Returns the fbank
    [n, frames, 128] (2998 frames for 30 s at 16 kHz) and a padding mask [n, frames] that is True
    on frames whose first hop of samples lies wholly in the padding (the frame-level reduction of
    a sample-level mask that the reference BEATs applies).
    """
    if not chunks:
        raise UniMoeInputError("no audio chunks given")
    chunk_len = int(round(chunk_seconds * sampling_rate))
    hop = int(sampling_rate * 10 / 1000)
    waves, lengths = [], []
    for i, chunk in enumerate(chunks):
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 1 or chunk.size == 0:
            raise UniMoeInputError(
                f"audio chunk {i} must be a non-empty 1-D waveform, got shape {chunk.shape}"
            )
        if chunk.size > chunk_len:
            raise UniMoeInputError(f"audio chunk {i} is longer than {chunk_seconds} s ({chunk.size} samples)")
        waves.append(np.pad(chunk, (0, chunk_len - chunk.size), mode="edge"))
        lengths.append(chunk.size)
    waveform = torch.from_numpy(np.stack(waves)) * 2**15  # [n, chunk_len]
    fbank = kaldi_fbank(waveform, num_mel_bins=128, sample_frequency=sampling_rate)
    fbank = (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
    frame_starts = torch.arange(fbank.shape[1]) * hop  # [frames]
    padding_mask = frame_starts[None, :] >= torch.tensor(lengths)[:, None]  # [n, frames]
    return fbank, padding_mask


def default_whisper_feature_extractor(chunk_seconds: float = 30.0) -> WhisperFeatureExtractor:
    """A Whisper-small feature extractor (80 mel bins, 16 kHz) for ``chunk_seconds`` windows, built locally."""
    return WhisperFeatureExtractor(
        feature_size=80,
        sampling_rate=16000,
        hop_length=160,
        chunk_length=int(chunk_seconds),
        n_fft=400,
        padding_value=0.0,
    )


def whisper_features(chunks: list[np.ndarray], feature_extractor: WhisperFeatureExtractor) -> torch.Tensor:
    """Whisper log-mel input features of each chunk, padded to the extractor's window: [n, 80, 3000]."""
    if not chunks:
        raise UniMoeInputError("no audio chunks given")
    max_len = feature_extractor.n_samples
    for i, chunk in enumerate(chunks):
        if np.asarray(chunk).size > max_len:
            seconds = max_len / feature_extractor.sampling_rate
            raise UniMoeInputError(f"audio chunk {i} is longer than the {seconds:g} s Whisper window")
    features = feature_extractor(
        [np.asarray(chunk, dtype=np.float32) for chunk in chunks],
        sampling_rate=feature_extractor.sampling_rate,
        padding="max_length",
        return_tensors="pt",
    )
    return features["input_features"]

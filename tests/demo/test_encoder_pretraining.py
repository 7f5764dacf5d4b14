"""Stage 0: the encoders' own pre-training objectives, on a few tiny batches."""

import numpy as np
import pytest
import torch

from unimoe.demo.encoder_pretraining import (
    ClipObjective,
    character_ids,
    pretrain_audio,
    pretrain_encoders,
    pretrain_speech,
    pretrain_vision,
)
from unimoe.demo.synth import pretraining_corpus
from unimoe.demo.synth_media import SOUNDS
from unimoe.presets import build_tiny


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny(seed=0, moe_layers="none")


@pytest.fixture(scope="module")
def corpus():
    return pretraining_corpus(seed=3, n_images=48, n_clips=8, n_speech=24, n_sounds=24)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def _mean(xs):
    return sum(xs) / len(xs)


def test_character_ids_hand_computed():
    # a=3, ..., e=7, n=16, o=17; then the end id 2
    assert character_ids("one") == [17, 16, 7, 2]
    assert character_ids("a b") == [3, 3 + 26, 4, 2]
    with pytest.raises(ValueError, match="outside"):
        character_ids("Two")


def test_pretraining_corpus_is_deterministic_and_captioned(corpus):
    again = pretraining_corpus(seed=3, n_images=48, n_clips=8, n_speech=24, n_sounds=24)
    assert all(np.array_equal(a, b) for a, b in zip(corpus.images, again.images))
    assert all(np.array_equal(a, b) for a, b in zip(corpus.speech, again.speech))
    assert corpus.captions == again.captions and corpus.clip_captions == again.clip_captions
    assert len(corpus.images) == 48 and corpus.clips[0].shape == (8, 32, 32, 3)
    assert all(len(c.split()) == 3 for c in corpus.captions)  # "a <colour> <shape>"
    assert all(c.split()[3] == "moving" for c in corpus.clip_captions)
    assert set(corpus.sound_labels) <= set(range(len(SOUNDS)))
    other = pretraining_corpus(seed=4, n_images=48, n_clips=0, n_speech=0, n_sounds=0)
    assert not all(np.array_equal(a, b) for a, b in zip(corpus.images, other.images))


def test_pretraining_corpus_parts_do_not_depend_on_each_other(corpus):
    # the demo makes the vision part and the audio part in two processes
    vision = pretraining_corpus(seed=3, n_images=48, n_clips=8, n_speech=0, n_sounds=0)
    audio = pretraining_corpus(seed=3, n_images=0, n_clips=0, n_speech=24, n_sounds=24)
    assert all(np.array_equal(a, b) for a, b in zip(corpus.clips, vision.clips))
    assert vision.captions == corpus.captions and vision.clip_captions == corpus.clip_captions
    assert all(np.array_equal(a, b) for a, b in zip(corpus.speech, audio.speech))
    assert all(np.array_equal(a, b) for a, b in zip(corpus.sounds, audio.sounds))
    assert audio.transcripts == corpus.transcripts and audio.sound_labels == corpus.sound_labels
    assert not vision.speech and not audio.images


def test_vision_pretraining_learns_and_writes_back(tiny, corpus):
    model, processor = tiny
    tower = model.model.vision_tower
    before = _state(tower)
    pixels = torch.stack([processor.featurize("image", im)[0] for im in corpus.images])
    clips = torch.stack([processor.featurize("video", list(c))[0] for c in corpus.clips])
    losses = pretrain_vision(
        tower,
        pixels,
        corpus.captions,
        processor.tokenizer,
        clips,
        corpus.clip_captions,
        steps=60,
        batch_size=16,
    )
    assert len(losses) == 60 and all(np.isfinite(losses))
    assert _mean(losses[-10:]) < 0.8 * _mean(losses[:10])
    assert _changed(before, tower)


def test_repeated_captions_are_embedded_once_with_the_same_result(tiny, corpus):
    """The text tower runs once per distinct caption in a batch; embeddings and the gradients they send
    back equal those of embedding every caption on its own."""
    model, processor = tiny
    pixels = torch.stack([processor.featurize("image", im)[0] for im in corpus.images])
    objective = ClipObjective(model.model.vision_tower, pixels, corpus.captions, processor.tokenizer)
    same_text = [[a == b for b in corpus.captions] for a in corpus.captions]
    same_id = (objective.text_of[:, None] == objective.text_of[None, :]).tolist()
    assert same_id == same_text
    index = torch.tensor([0, 5, 0, 7, 5, 5, 12])
    assert len(set(corpus.captions[i] for i in index.tolist())) < len(index)
    calls = []
    hook = objective.clip.text_model.register_forward_hook(
        lambda m, args, kw, out: calls.append(kw), with_kwargs=True
    )
    weights = torch.randn(len(index), objective.clip.text_projection.out_features)
    (objective.caption_embeddings(index) * weights).sum().backward()
    hook.remove()
    assert calls[0]["input_ids"].shape[0] == len(set(corpus.captions[i] for i in index.tolist()))
    grads = {n: p.grad.clone() for n, p in objective.clip.named_parameters() if p.grad is not None}
    objective.clip.zero_grad()
    alone = torch.cat([objective.text_embeddings(objective.text_of[i : i + 1]) for i in index])
    (alone * weights).sum().backward()
    torch.testing.assert_close(objective.caption_embeddings(index), alone, rtol=1e-5, atol=1e-6)
    for name, param in objective.clip.named_parameters():
        if name in grads:
            scale = float(param.grad.abs().max())  # sums in another order: fp32 rounding of the largest entry
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-6 + 1e-5 * scale, msg=name)


def test_clip_frames_encodes_evenly_spaced_frames_with_the_loss_of_those_frames_alone(tiny, corpus):
    """With ``clip_frames`` a step encodes that many evenly spaced frames of each clip, from a random
    first frame; its loss equals that of an objective given only those frames of every clip."""
    model, processor = tiny
    pixels = torch.stack([processor.featurize("image", im)[0] for im in corpus.images])
    clips = torch.stack([processor.featurize("video", list(c))[0] for c in corpus.clips])  # 8 frames
    data = (pixels, corpus.captions, processor.tokenizer, clips, corpus.clip_captions)
    subset = ClipObjective(model.model.vision_tower, *data, clip_frames=4)
    starts = {tuple(subset.frames_to_encode().tolist()) for _ in range(40)}
    assert starts == {(0, 2, 4, 6), (1, 3, 5, 7)}
    assert ClipObjective(model.model.vision_tower, *data).frames_to_encode().tolist() == list(range(8))
    assert ClipObjective(model.model.vision_tower, *data, clip_frames=8).frames_to_encode().tolist() == list(
        range(8)
    )
    for first in (0, 1):
        subset = ClipObjective(model.model.vision_tower, *data, clip_frames=4)
        subset.frames_to_encode = lambda first=first: first + 2 * torch.arange(4)
        alone = ClipObjective(
            model.model.vision_tower,
            pixels,
            corpus.captions,
            processor.tokenizer,
            clips[:, first::2].contiguous(),
            corpus.clip_captions,
        )
        alone.clip.load_state_dict(subset.clip.state_dict())
        index = torch.arange(12)
        subset.generator.manual_seed(5)
        alone.generator.manual_seed(5)
        with torch.no_grad():
            torch.testing.assert_close(subset.loss(index), alone.loss(index), rtol=1e-6, atol=1e-6)


def test_speech_pretraining_learns_transcription(tiny, corpus):
    model, processor = tiny
    encoder = model.model.speech_encoder
    before = _state(encoder)
    features = torch.cat([processor.featurize("speech", clip)[0][:1] for clip in corpus.speech])
    losses = pretrain_speech(encoder, features, corpus.transcripts, steps=40, batch_size=8)
    assert _mean(losses[-5:]) < 0.75 * _mean(losses[:5])
    assert _changed(before, encoder)


def test_audio_pretraining_learns_tags(tiny, corpus):
    model, processor = tiny
    encoder = model.model.audio_encoder
    before = _state(encoder)
    items = [processor.featurize("audio", clip) for clip in corpus.sounds]
    fbank = torch.cat([f[:1] for f, _, _ in items])
    mask = torch.cat([m[:1] for _, m, _ in items])
    losses = pretrain_audio(encoder, fbank, mask, corpus.sound_labels, len(SOUNDS), steps=40, batch_size=8)
    assert _mean(losses[-5:]) < 0.7 * _mean(losses[:5])
    assert _changed(before, encoder)


def test_pretrain_encoders_runs_only_what_is_asked(corpus):
    torch.set_num_threads(1)
    model, processor = build_tiny(seed=1, moe_layers="none")
    vision, speech = _state(model.model.vision_tower), _state(model.model.speech_encoder)
    losses = pretrain_encoders(model, processor, corpus, {"audio": 3, "vision": 0}, len(SOUNDS))
    assert set(losses) == {"audio"} and len(losses["audio"]) == 3
    assert not _changed(vision, model.model.vision_tower) and not _changed(speech, model.model.speech_encoder)

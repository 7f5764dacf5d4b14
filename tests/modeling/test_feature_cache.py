import gc

import pytest
import torch

from unimoe.modalities import media
from unimoe.modeling.feature_cache import FrozenFeatureCache
from unimoe.presets import build_tiny


def record(rid, prompt, **media_paths):
    return {
        "id": rid,
        **media_paths,
        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "an answer"}],
    }


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0)
    model.model.requires_grad_(True)
    for encoder in model.model.encoders():
        encoder.requires_grad_(False).eval()  # frozen, as the training loop leaves them
    return model, processor


@pytest.fixture
def samples(tiny, fixtures_dir):
    _, processor = tiny
    fx = fixtures_dir
    records = [
        record("image", "<image>\nWhat is this?", image=str(fx / "photo.jpg")),
        record("video", "<video>\nWhat happens?", video=str(fx / "clip.mp4")),
        record("speech", "<speech>\nWhat is said?", speech=[str(fx / "speech.wav")]),
        record("audio", "<audio>\nWhat sound?", audio=[str(fx / "sound.wav")]),
        record(
            "both", "<image>\n<audio>\nAnd these?", image=str(fx / "photo.jpg"), audio=[str(fx / "sound.wav")]
        ),
    ]
    encoded = [processor.encode_record(r) for r in records + records[2:3]]
    # distinct media in the later samples, so that rows put in the wrong order would show
    both, speech = encoded[4], encoded[5]
    both.media["image"][0] = both.media["image"][0].flip(-1)
    both.media["audio"][0] = both.media["audio"][0] * 0.5
    speech.media["speech"][0] = speech.media["speech"][0] * 0.9
    return encoded


def items_of(batch_samples):
    return {m.name: [t for s in batch_samples for t in s.media[m.name]] for m in media()}


class RowCounter:
    """Rows each encoder is run on (CLIP through its embeddings, as ``encode_images`` calls it)."""

    def __init__(self, model):
        inner = model.model
        self.rows = {"vision": 0, "speech": 0, "audio": 0}
        parts = {"vision": inner.vision_tower.embeddings, "speech": inner.speech_encoder}
        parts["audio"] = inner.audio_encoder
        self.handles = [
            part.register_forward_pre_hook(
                lambda _, args, kwargs, k=k: self.add(k, args, kwargs), with_kwargs=True
            )
            for k, part in parts.items()
        ]

    def add(self, key, args, kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        self.rows[key] += first.shape[0]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def loss_and_grads(model, processor, batch_samples, cache=None):
    inputs = dict(processor.collate(batch_samples))
    model.zero_grad(set_to_none=True)
    model.model.feature_cache = cache
    try:
        if cache is None:
            out = model(**inputs)
        else:
            with cache.batch(items_of(batch_samples)):
                out = model(**inputs)
    finally:
        model.model.feature_cache = None
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def test_cached_outputs_give_the_loss_and_gradients_of_the_encoders(tiny, samples):
    """Every modality: a first batch (all encoded), then another mixing kept items and new ones, each
    against the model without a cache. Tolerance: batched matmuls over fewer rows may round
    differently (fp32, 1e-6 relative)."""
    model, processor = tiny
    cache = FrozenFeatureCache()
    counter = RowCounter(model)
    try:
        for batch_samples in (samples[:4], [samples[4], samples[0], samples[2], samples[5]]):
            before = dict(counter.rows)
            loss, grads = loss_and_grads(model, processor, batch_samples, cache)
            cached_rows = {k: counter.rows[k] - before[k] for k in before}
            expected_loss, expected_grads = loss_and_grads(model, processor, batch_samples)
            torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
            assert grads.keys() == expected_grads.keys() and grads
            for name, grad in grads.items():
                torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    finally:
        counter.remove()
    # the second batch: sample 4's image and audio chunks and sample 5's speech chunks are new; sample
    # 0's image and sample 2's speech were kept
    chunks = {k: len(samples[i].media[k][0]) for i, k in ((4, "audio"), (5, "speech"))}
    assert cached_rows == {"vision": 1, **chunks}
    assert cache.misses == 4 + 3 and cache.hits == 2


def test_entries_go_with_their_items(tiny, samples):
    model, processor = tiny
    cache = FrozenFeatureCache()
    loss_and_grads(model, processor, samples[:2], cache)
    assert len(cache) == 2  # an image and a clip
    del samples[:2]  # the last references to those samples' tensors
    gc.collect()
    assert len(cache) == 0


def test_trainable_encoders_are_not_cached(tiny, samples):
    model, processor = tiny
    tower = model.model.vision_tower
    cache = FrozenFeatureCache()
    tower.requires_grad_(True)
    try:
        loss_and_grads(model, processor, samples[:1], cache)
    finally:
        tower.requires_grad_(False)
    assert len(cache) == 0 and cache.misses == 0
    tower.train()
    try:
        loss_and_grads(model, processor, samples[:1], cache)
    finally:
        tower.eval()
    assert len(cache) == 0  # in training mode (dropout) its outputs change from call to call


def test_mismatched_items_are_refused(tiny, samples):
    model, processor = tiny
    cache = FrozenFeatureCache()
    inputs = dict(processor.collate(samples[:1]))
    model.model.feature_cache = cache
    try:
        with (
            cache.batch({"image": [samples[0].media["image"][0]] * 2}),
            pytest.raises(ValueError, match="image"),
        ):
            model(**inputs)
    finally:
        model.model.feature_cache = None

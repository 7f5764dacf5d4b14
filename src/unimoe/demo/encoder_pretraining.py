"""Short pre-training of small encoders, the stand-in for pretrained CLIP, Whisper and BEATs.

The real Uni-MoE starts from encoders pretrained on web-scale data and keeps them frozen. A model
built from a preset has random encoders, whose features carry colour and loudness but little shape,
motion or phonetics. These functions give such encoders the pre-training objective of their
originals on a captioned corpus, using the original model classes from transformers:

- ``pretrain_vision``: CLIP's symmetric contrastive image-caption loss on a ``CLIPModel``, whose small
  text tower is built for the occasion and thrown away afterwards; scores are token-wise (see there).
- ``pretrain_speech``: Whisper's transcription loss (``WhisperForConditionalGeneration``), on a
  character vocabulary.
- ``pretrain_audio``: BEATs' fine-tuning objective, sound-class tagging from mean-pooled features.

Each trains a copy of the encoder (plus its throw-away head) and writes the trained encoder weights
back in place. Returns the loss per step.
"""

from __future__ import annotations

import copy
import logging
import string
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    WhisperForConditionalGeneration,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..modeling.beats import BEATsModel
from ..seeding import seed_everything
from ..training.optim import build_optimizer, build_scheduler
from ..training.recipe import OptimSpec

logger = logging.getLogger(__name__)

OBJECTIVES = {"vision": "CLIP vision", "speech": "Whisper ASR", "audio": "BEATs tagging"}
CHARACTERS = string.ascii_lowercase + " '"
_FIRST_CHAR_ID = 3  # 0 pad, 1 start, 2 end


def _fit(
    params: list[nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    n: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    name: str,
) -> list[float]:
    """The stages' AdamW and warm-up + cosine schedule over random batches of indices into ``n`` items."""
    spec = OptimSpec(lr=lr, weight_decay=0.01, warmup_ratio=0.05)
    optimizer = build_optimizer(params, spec)
    schedule = build_scheduler(optimizer, spec, steps)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=f"stage 0: {name}", dynamic_ncols=True)
    for _ in bar:
        index = torch.randint(n, (min(batch_size, n),), generator=generator)
        loss = loss_of(index)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, spec.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    logger.info("%s pre-training: loss %.4f -> %.4f in %d steps", name, losses[0], losses[-1], steps)
    return losses


def _caption_ids(captions: Sequence[str], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded caption ids ending in the tokenizer's end token, and their attention mask."""
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in captions]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return ids, mask


def pretrain_vision(
    tower: CLIPVisionModel,
    pixel_values: torch.Tensor,
    captions: Sequence[str],
    tokenizer,
    clip_pixel_values: torch.Tensor | None = None,
    clip_captions: Sequence[str] = (),
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    feature_layer: int = -2,
) -> list[float]:
    """CLIP contrastive pre-training of ``tower`` on images ``[N, 3, H, W]`` and video clips
    ``[M, F, 3, H, W]`` with their captions.

    The score of an image and a caption is the mean, over the image's patch tokens at
    ``feature_layer`` (CLS dropped), of their cosine similarities to the caption (token-wise, as in
    FILIP): every token the LLM reads is taught the caption, so a frozen LLM can read any of them. A
    clip's score averages over the patch tokens of all its frames (the model mean-pools a clip's
    frames, so what every frame's tokens say survives the pooling).
    Each step holds ``batch_size`` images and half as many clips.
    """
    vision = tower.config
    n_clips = 0 if clip_pixel_values is None else len(clip_pixel_values)
    ids, mask = _caption_ids([*captions, *clip_captions], tokenizer)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=vision.num_attention_heads,
        max_position_embeddings=ids.shape[1],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or 0,
    )
    seed_everything(seed)
    clip = CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=vision.projection_dim)
    )
    clip.vision_model.load_state_dict(tower.state_dict())
    clip.train()
    last = mask.sum(1) - 1  # the end token: CLIP pools its text there
    generator = torch.Generator().manual_seed(seed + 1)

    def similarity(text_embeds: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Mean cosine similarity of each caption to each patch token of ``frames`` ``[B, F, 3, H, W]``
        at ``feature_layer`` (CLS dropped), over patches and frames: ``[texts, B]``."""
        states = clip.vision_model(pixel_values=frames.flatten(0, 1), output_hidden_states=True).hidden_states
        tokens = clip.visual_projection(clip.vision_model.post_layernorm(states[feature_layer][:, 1:]))
        tokens = nn.functional.normalize(tokens.reshape(frames.shape[0], -1, tokens.shape[-1]), dim=-1)
        return torch.einsum("td,ipd->tip", text_embeds, tokens).mean(-1)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        caption_index = index
        if n_clips:
            picked = torch.randint(n_clips, (max(1, len(index) // 2),), generator=generator)
            caption_index = torch.cat([index, len(captions) + picked])
        # CLIP's own text pooling takes the highest id for end id 2 (a legacy rule), so pool here.
        text_states = clip.text_model(input_ids=ids[caption_index], attention_mask=mask[caption_index])
        text_embeds = clip.text_projection(
            text_states.last_hidden_state[torch.arange(len(caption_index)), last[caption_index]]
        )
        text_embeds = nn.functional.normalize(text_embeds, dim=-1)
        scores = similarity(text_embeds, pixel_values[index].unsqueeze(1))
        if n_clips:
            scores = torch.cat([scores, similarity(text_embeds, clip_pixel_values[picked])], dim=1)
        logits = clip.logit_scale.exp() * scores  # [texts, images]
        target = torch.arange(len(caption_index))
        return (
            nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
        ) / 2

    losses = _fit(
        list(clip.parameters()), loss_of, len(captions), steps, batch_size, lr, seed, OBJECTIVES["vision"]
    )
    tower.load_state_dict(clip.vision_model.state_dict())
    return losses


def character_ids(text: str) -> list[int]:
    """``text`` as ids of ``CHARACTERS`` (offset past pad/start/end) followed by the end id 2."""
    unknown = set(text) - set(CHARACTERS)
    if unknown:
        raise ValueError(f"transcript {text!r} has characters outside {CHARACTERS!r}: {sorted(unknown)}")
    return [_FIRST_CHAR_ID + CHARACTERS.index(c) for c in text] + [2]


def pretrain_speech(
    encoder: WhisperEncoder,
    features: torch.Tensor,
    transcripts: Sequence[str],
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Whisper transcription pre-training of ``encoder`` on log-mel ``features`` ``[N, 80, frames]``."""
    config = encoder.config
    if config.vocab_size < _FIRST_CHAR_ID + len(CHARACTERS):
        raise ValueError(f"speech vocab_size {config.vocab_size} is too small for a character vocabulary")
    rows = [character_ids(t) for t in transcripts]
    labels = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        labels[i, : len(row)] = torch.tensor(row)
    seed_everything(seed)
    asr = WhisperForConditionalGeneration(config)
    asr.model.encoder.load_state_dict(encoder.state_dict())
    asr.train()

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        return asr(input_features=features[index], labels=labels[index]).loss

    losses = _fit(
        list(asr.parameters()), loss_of, len(rows), steps, batch_size, lr, seed, OBJECTIVES["speech"]
    )
    encoder.load_state_dict(asr.model.encoder.state_dict())
    return losses


def pretrain_audio(
    encoder: BEATsModel,
    fbank: torch.Tensor,
    padding_mask: torch.Tensor,
    labels: Sequence[int],
    num_classes: int,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 5e-3,
    seed: int = 0,
) -> list[float]:
    """BEATs tagging pre-training of ``encoder`` on fbank ``[N, T, 128]`` (padding mask ``[N, T]``)."""
    seed_everything(seed)
    tagger = copy.deepcopy(encoder).requires_grad_(True).train()
    head = nn.Linear(encoder.config.encoder_embed_dim, num_classes)
    target = torch.as_tensor(labels, dtype=torch.long)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        feats, mask = tagger(fbank[index], padding_mask[index])  # [B, T', D], [B, T']
        keep = (~mask).unsqueeze(-1).to(feats.dtype)
        pooled = (feats * keep).sum(1) / keep.sum(1).clamp(min=1)
        return nn.functional.cross_entropy(head(pooled), target[index])

    params = [*tagger.parameters(), *head.parameters()]
    losses = _fit(params, loss_of, len(target), steps, batch_size, lr, seed, OBJECTIVES["audio"])
    encoder.load_state_dict(tagger.state_dict())
    return losses


def pretrain_encoders(
    model, processor, corpus, steps: dict[str, int], num_sound_classes: int, seed: int = 0
) -> dict[str, list[float]]:
    """Pre-trains the encoders of ``model`` that ``steps`` names (``vision``, ``speech``, ``audio``) on
    ``corpus`` (a ``unimoe.demo.synth.PretrainingCorpus``), featurised by ``processor``.

    Returns the loss curve per encoder. The encoders are left in eval mode; freezing them is the
    training stages' business.
    """
    losses: dict[str, list[float]] = {}
    if steps.get("vision"):
        pixels = torch.stack([processor.featurize("image", image)[0] for image in corpus.images])
        clips = torch.stack([processor.featurize("video", list(clip))[0] for clip in corpus.clips])
        losses["vision"] = pretrain_vision(
            model.model.vision_tower,
            pixels,
            corpus.captions,
            processor.tokenizer,
            clips,
            corpus.clip_captions,
            steps=steps["vision"],
            seed=seed,
        )
    if steps.get("speech"):  # clips are shorter than a chunk: the first chunk holds the word
        features = torch.cat([processor.featurize("speech", clip)[0][:1] for clip in corpus.speech])
        losses["speech"] = pretrain_speech(
            model.model.speech_encoder, features, corpus.transcripts, steps["speech"], seed=seed
        )
    if steps.get("audio"):
        items = [processor.featurize("audio", clip) for clip in corpus.sounds]
        fbank = torch.cat([fbank[:1] for fbank, _, _ in items])
        mask = torch.cat([mask[:1] for _, mask, _ in items])
        losses["audio"] = pretrain_audio(
            model.model.audio_encoder,
            fbank,
            mask,
            corpus.sound_labels,
            num_sound_classes,
            steps["audio"],
            seed=seed,
        )
    model.eval()
    return losses

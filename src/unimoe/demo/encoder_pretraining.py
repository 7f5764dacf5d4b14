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
import re
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
from ..training.optim import build_optimizer, build_scheduler, clip_gradients
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
        clip_gradients(params, spec.max_grad_norm)
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


class ClipObjective:
    """CLIP's symmetric contrastive loss for a vision tower, on a throw-away ``CLIPModel``.

    The score of an image and a caption is the mean, over the image's patch tokens at
    ``feature_layer`` (CLS dropped), of their cosine similarities to the caption (token-wise, as in
    FILIP): every token the LLM reads is taught the caption, so a frozen LLM can read any of them. A
    clip's score averages over the patch tokens of all its frames (the model mean-pools a clip's
    frames, so what every frame's tokens say survives the pooling). ``clip`` holds the tower's layers
    up to ``feature_layer`` only (the later ones cannot change the loss) and a one-layer text tower
    built for the occasion. ``clip_frames``: how many evenly spaced frames of each clip a step
    encodes (from a random first frame; all of them when None): the synthetic clips show their
    motion in every frame, and the clips' frames are most of a step's images.
    """

    def __init__(
        self,
        tower: CLIPVisionModel,
        pixel_values: torch.Tensor,
        captions: Sequence[str],
        tokenizer,
        clip_pixel_values: torch.Tensor | None = None,
        clip_captions: Sequence[str] = (),
        seed: int = 0,
        feature_layer: int = -2,
        clip_frames: int | None = None,
    ):
        vision = tower.config
        self.pixel_values, self.clip_pixel_values = pixel_values, clip_pixel_values
        self.clip_frames = clip_frames
        self.n_images = len(captions)
        self.n_clips = 0 if clip_pixel_values is None else len(clip_pixel_values)
        texts = [*captions, *clip_captions]
        distinct = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        self.text_of = torch.tensor([distinct[text] for text in texts])  # caption -> its distinct text
        self.ids, self.mask = _caption_ids(list(distinct), tokenizer)
        text = dict(
            vocab_size=len(tokenizer),
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=vision.num_attention_heads,
            max_position_embeddings=self.ids.shape[1],
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        depth = feature_layer % vision.num_hidden_layers + 1 if feature_layer < 0 else feature_layer
        seed_everything(seed)
        self.clip = CLIPModel(
            CLIPConfig(
                text_config=text,
                vision_config={**vision.to_dict(), "num_hidden_layers": depth},
                projection_dim=vision.projection_dim,
            )
        )
        _load_layers_up_to(self.clip.vision_model, tower.state_dict(), depth)
        # sequences of a few dozen tokens: SDPA's CPU kernels cost more than plain matmuls here
        self.clip.set_attn_implementation("eager")
        self.clip.train()
        self.last = self.mask.sum(1) - 1  # the end token: CLIP pools its text there
        self.generator = torch.Generator().manual_seed(seed + 1)

    def similarity(self, text_embeds: torch.Tensor, frames: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Mean cosine similarity of each caption to each patch token of each item's frames, over
        patches and frames: ``[texts, items]``. ``frames``: ``[sum(counts), 3, H, W]``, item i's
        ``counts[i]`` frames in a row."""
        vision_model = self.clip.vision_model
        states = vision_model(pixel_values=frames).last_hidden_state  # [N, 1+P, Dv]
        tokens = self.clip.visual_projection(vision_model.post_layernorm(states[:, 1:]))
        tokens = nn.functional.normalize(tokens, dim=-1)  # [N, P, d]
        per_frame = torch.einsum("td,npd->tn", text_embeds, tokens) / tokens.shape[1]  # [texts, N]
        item = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # [N]
        total = per_frame.new_zeros(per_frame.shape[0], len(counts)).index_add_(1, item, per_frame)
        return total / torch.tensor(counts, dtype=total.dtype)

    def captions_for(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The caption ids of the images ``index`` then of half as many random clips, and those clips."""
        if not self.n_clips:
            return index, None
        picked = torch.randint(self.n_clips, (max(1, len(index) // 2),), generator=self.generator)
        return torch.cat([index, self.n_images + picked]), picked

    def caption_embeddings(self, caption_index: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings ``[texts, d]`` of the captions ``caption_index``; the text tower
        runs once per distinct caption text among them (the synthetic captions repeat)."""
        distinct, inverse = torch.unique(self.text_of[caption_index], return_inverse=True)
        return self.text_embeddings(distinct)[inverse]

    def text_embeddings(self, text_index: torch.Tensor) -> torch.Tensor:
        """Unit-norm text embeddings ``[texts, d]`` of the distinct caption texts ``text_index``."""
        clip = self.clip
        # CLIP's own text pooling takes the highest id for end id 2 (a legacy rule), so pool here.
        ids, mask = self.ids[text_index], self.mask[text_index]
        states = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = states[torch.arange(len(text_index)), self.last[text_index]]
        return nn.functional.normalize(clip.text_projection(pooled), dim=-1)

    def contrastive(self, scores: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric cross-entropy over ``scores`` ``[texts, items]`` (matching pairs on the diagonal)."""
        logits = self.clip.logit_scale.exp() * scores
        target = torch.arange(len(scores))
        return (
            nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)
        ) / 2

    def loss(self, index: torch.Tensor) -> torch.Tensor:
        """The loss on the images ``index`` and (with clips) half as many random clips."""
        caption_index, picked = self.captions_for(index)
        text_embeds = self.caption_embeddings(caption_index)
        images = self.pixel_values[index]  # [B, 3, H, W]
        if picked is None:
            return self.contrastive(self.similarity(text_embeds, images, [1] * len(index)))
        clips = self.clip_pixel_values[picked[:, None], self.frames_to_encode()]  # [B/2, f, 3, H, W]
        frames = [1] * len(index) + [clips.shape[1]] * len(picked)
        return self.contrastive(
            self.similarity(text_embeds, torch.cat([images, clips.flatten(0, 1)]), frames)
        )

    def frames_to_encode(self) -> torch.Tensor:
        """The frame indices a step encodes of each clip: ``clip_frames`` evenly spaced ones from a random
        first frame, or all of them."""
        total = self.clip_pixel_values.shape[1]
        if not self.clip_frames or self.clip_frames >= total:
            return torch.arange(total)
        stride = total // self.clip_frames
        first = torch.randint(stride, (), generator=self.generator)
        return first + stride * torch.arange(self.clip_frames)

    def write_back(self, tower: CLIPVisionModel) -> None:
        """Copies the trained layers into ``tower``; its layers after ``feature_layer`` stay as they were."""
        tower.load_state_dict(self.clip.vision_model.state_dict(), strict=False)


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
    clip_frames: int | None = None,
) -> list[float]:
    """CLIP contrastive pre-training (``ClipObjective``) of ``tower`` on images ``[N, 3, H, W]`` and
    video clips ``[M, F, 3, H, W]`` with their captions; each step holds ``batch_size`` images and
    half as many clips, ``clip_frames`` frames of each."""
    objective = ClipObjective(
        tower,
        pixel_values,
        captions,
        tokenizer,
        clip_pixel_values,
        clip_captions,
        seed,
        feature_layer,
        clip_frames,
    )
    params = list(objective.clip.parameters())
    losses = _fit(params, objective.loss, len(captions), steps, batch_size, lr, seed, OBJECTIVES["vision"])
    objective.write_back(tower)
    return losses


def _load_layers_up_to(module: nn.Module, state: dict[str, torch.Tensor], depth: int) -> None:
    """Loads ``state`` into ``module``, a vision tower cut after encoder layer ``depth``."""

    def kept(key: str) -> bool:
        layer = re.match(r"encoder\.layers\.(\d+)\.", key)
        return layer is None or int(layer.group(1)) < depth

    kept_state = {k: v for k, v in state.items() if kept(k)}
    missing, unexpected = module.load_state_dict(kept_state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"vision tower layout mismatch: missing {missing}, unexpected {unexpected}")


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
    model,
    processor,
    corpus,
    steps: dict[str, int],
    num_sound_classes: int,
    seed: int = 0,
    clip_frames: int | None = None,
) -> dict[str, list[float]]:
    """Pre-trains the encoders of ``model`` that ``steps`` names (``vision``, ``speech``, ``audio``) on
    ``corpus`` (a ``unimoe.demo.synth.PretrainingCorpus``), featurised by ``processor``; a CLIP step
    encodes ``clip_frames`` frames of each clip (``ClipObjective``).

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
            clip_frames=clip_frames,
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

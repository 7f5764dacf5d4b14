"""``UniMoeProcessor``: conversations with media in, model-ready tensors out.

It renders the Vicuna v1 template, loads and featurises every media item, expands each placeholder
to exactly as many tokens as its media yields features, masks labels outside assistant answers, and
pads a batch. A sample is fully encoded before it joins a batch, so bad input never half-enters one.
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature, CLIPImageProcessorPil, WhisperFeatureExtractor

from ..errors import UniMoeInputError
from ..modalities import MODALITIES, media, media_names
from .audio import beats_fbank, chunk_audio, default_whisper_feature_extractor, whisper_features
from .conversation import SYSTEM_PROMPT, Turn, chat_template, message_turns, record_turns, render_template
from .media import load_audio, load_image, load_video

IGNORE_INDEX = -100
SETTINGS_FILE = "unimoe_processor.json"
TINY_TOKENIZER = files("unimoe") / "assets" / "tokenizer"


@dataclass
class ProcessorSettings:
    """How many tokens each medium becomes and how media are cut; mirrors the model config.

    ``release_speech_chunking`` reproduces the release's speech cutting (pieces one sample longer than a
    chunk, the extra sample dropped, so from the second chunk on each starts a sample later) for exact
    parity with its outputs; off by default, since it silently drops a sample per chunk.
    """

    image_tokens: int = 576
    video_tokens: int = 576
    video_frames: int = 8
    speech_tokens_per_chunk: int = 50
    audio_tokens_per_chunk: int = 50
    max_chunks: int = 20
    chunk_seconds: float = 30.0
    sampling_rate: int = 16000
    voice_modality: str = "speech"
    release_speech_chunking: bool = False
    pad_to_square: bool = False
    max_length: int | None = 2048
    system_prompt: str = SYSTEM_PROMPT
    modalities: list[str] = field(default_factory=media_names)

    def tokens(self, kind: str) -> int:
        """LLM tokens per item (image, video) or per audio chunk (speech, audio) of a modality kind."""
        return {
            "image": self.image_tokens,
            "video": self.video_tokens,
            "speech": self.speech_tokens_per_chunk,
            "audio": self.audio_tokens_per_chunk,
        }[kind]


@dataclass
class EncodedSample:
    """One conversation, tokenised with expanded placeholders and its media featurised."""

    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[torch.Tensor]]
    masks: dict[str, list[torch.Tensor]]
    modality_tokens: dict[str, int]


class UniMoeProcessor:
    """Tokenizer (LLaMA SentencePiece) + CLIP image processor + Whisper feature extractor + BEATs fbank."""

    def __init__(
        self,
        tokenizer,
        image_processor: CLIPImageProcessorPil | None = None,
        feature_extractor: WhisperFeatureExtractor | None = None,
        settings: ProcessorSettings | None = None,
    ):
        self.tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor or default_whisper_feature_extractor()
        self.settings = settings or ProcessorSettings()
        self.tokenizer.add_special_tokens(
            {"additional_special_tokens": [m.placeholder for m in media()]},
            replace_extra_special_tokens=False,
        )
        self.placeholder_ids = {m.name: self.tokenizer.convert_tokens_to_ids(m.placeholder) for m in media()}
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.unk_token  # LLaMA: pad = unk = 0
        self.tokenizer.chat_template = chat_template(self.settings.system_prompt)

    # construction and persistence -------------------------------------------------------------

    @classmethod
    def for_config(cls, config, tokenizer=None, max_length: int | None = None) -> UniMoeProcessor:
        """A processor matching a ``UniMoeConfig`` (default tokenizer: the shipped tiny one)."""
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER), tokenizer_class="LlamaTokenizer")
        image_processor = None
        if config.vision_config is not None:
            size = config.vision_config.image_size
            image_processor = CLIPImageProcessorPil(
                size={"shortest_edge": size}, crop_size={"height": size, "width": size}
            )
        settings = ProcessorSettings(
            image_tokens=config.image_num_tokens() if config.vision_config is not None else 0,
            video_tokens=config.video_num_tokens() if config.vision_config is not None else 0,
            video_frames=config.video_num_frames,
            speech_tokens_per_chunk=config.speech_num_queries,
            audio_tokens_per_chunk=config.audio_num_queries,
            max_chunks=config.audio_max_chunks,
            chunk_seconds=config.chunk_seconds,
            voice_modality="speech" if config.speech_config is not None else "audio",
            max_length=max_length or config.text_config.max_position_embeddings,
            modalities=config.modalities,
        )
        feature_extractor = default_whisper_feature_extractor(config.chunk_seconds)
        processor = cls(tokenizer, image_processor, feature_extractor, settings=settings)
        expected = config.placeholder_ids()
        if processor.placeholder_ids != expected:
            raise ValueError(
                f"tokenizer placeholder ids {processor.placeholder_ids} differ from the model's {expected}"
            )
        return processor

    def save_pretrained(self, directory: str | Path) -> None:
        """Writes tokenizer (with the chat template of ``render``), image processor, feature extractor and
        settings under ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.chat_template = chat_template(self.settings.system_prompt)
        self.tokenizer.save_pretrained(directory)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(directory / "image_processor")
        self.feature_extractor.save_pretrained(directory / "feature_extractor")
        (directory / SETTINGS_FILE).write_text(json.dumps(asdict(self.settings), indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> UniMoeProcessor:
        """Reads what ``save_pretrained`` wrote."""
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        image_processor = None
        if (directory / "image_processor").is_dir():
            image_processor = CLIPImageProcessorPil.from_pretrained(directory / "image_processor")
        feature_extractor = WhisperFeatureExtractor.from_pretrained(directory / "feature_extractor")
        settings = ProcessorSettings(**json.loads((directory / SETTINGS_FILE).read_text()))
        return cls(tokenizer, image_processor, feature_extractor, settings)

    # media -------------------------------------------------------------------------------------

    def _resolve(self, source: Any, media_root: str | Path | None) -> Any:
        if media_root is not None and isinstance(source, (str, Path)) and not Path(source).is_absolute():
            return Path(media_root) / source
        if isinstance(source, list):
            return [self._resolve(s, media_root) for s in source]
        return source

    def _pixels(self, images: list) -> torch.Tensor:
        if self.image_processor is None:
            raise UniMoeInputError("image or video input given, but this processor has no image processor")
        if self.settings.pad_to_square:
            images = [_pad_to_square(im, self.image_processor.image_mean) for im in images]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def featurize(self, modality: str, source: Any) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Loads one media item: ``(features, padding mask or None, number of LLM tokens)``, the way its
        modality's kind is featurised (see ``unimoe.modalities``)."""
        s = self.settings
        if modality not in s.modalities:
            raise UniMoeInputError(f"{modality} input given, but this model reads only {s.modalities}")
        kind = MODALITIES[modality].kind
        if kind == "image":
            return self._pixels([load_image(source)])[0], None, s.tokens(kind)
        if kind == "video":
            return self._pixels(load_video(source, s.video_frames)), None, s.tokens(kind)
        wave = load_audio(source, s.sampling_rate)
        skip = 1 if kind == "speech" and s.release_speech_chunking else 0
        chunks = chunk_audio(wave, s.sampling_rate, s.chunk_seconds, s.max_chunks, skip)
        if kind == "speech":
            return whisper_features(chunks, self.feature_extractor), None, len(chunks) * s.tokens(kind)
        fbank, mask = beats_fbank(chunks, s.sampling_rate, s.chunk_seconds)
        return fbank, mask, len(chunks) * s.tokens(kind)

    # encoding ----------------------------------------------------------------------------------

    def _tokens(self, text: str) -> list[int]:
        if not text:
            return []
        # a fast tokenizer's call sets its truncation and padding state: two threads calling it at
        # once fail with "Already borrowed"
        with self._tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_tokenizer_lock", None)  # locks do not pickle (data-loader workers)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokenizer_lock = threading.Lock()

    def encode_turns(
        self,
        turns: list[Turn],
        *,
        add_generation_prompt: bool = False,
        media_root: str | Path | None = None,
        system: str | None = None,
        name: str = "sample",
    ) -> EncodedSample:
        """Tokenises turns, expanding media placeholders; labels keep only assistant answers."""
        ids = [self.tokenizer.bos_token_id]
        labels = [IGNORE_INDEX]
        media: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
        masks: dict[str, list[torch.Tensor]] = {m: [] for m in MODALITIES}
        counts = {m: 0 for m in MODALITIES}
        text = ""
        supervised_text = False

        def flush() -> None:
            nonlocal text
            tokens = self._tokens(text)
            ids.extend(tokens)
            labels.extend(tokens if supervised_text else [IGNORE_INDEX] * len(tokens))
            text = ""

        template = render_template(turns, system or self.settings.system_prompt, add_generation_prompt)
        for part, supervised in template:
            if isinstance(part, str) and supervised == supervised_text:
                text += part
                continue
            flush()
            supervised_text = supervised
            if isinstance(part, str):
                text = part
            elif part is None:
                ids.append(self.tokenizer.eos_token_id)
                labels.append(self.tokenizer.eos_token_id)
            else:
                modality, source = part
                try:
                    feats, mask, n = self.featurize(modality, self._resolve(source, media_root))
                except UniMoeInputError as err:
                    raise UniMoeInputError(f"{name}: {err}") from err
                media[modality].append(feats)
                if mask is not None:
                    masks[modality].append(mask)
                ids.extend([self.placeholder_ids[modality]] * n)
                labels.extend([IGNORE_INDEX] * n)
                counts[modality] += n
        flush()
        limit = self.settings.max_length
        if limit is not None and len(ids) > limit:
            raise UniMoeInputError(
                f"{name}: {len(ids)} tokens after media expansion exceed the limit of {limit}"
            )
        return EncodedSample(ids, labels, media, masks, counts)

    def encode_record(self, record: dict, media_root: str | Path | None = None, **kw) -> EncodedSample:
        """Encodes a record in the release's data format (see ``record_turns``)."""
        turns = record_turns(record, self.settings.voice_modality)
        return self.encode_turns(turns, media_root=media_root, name=f"record {record.get('id', '?')!r}", **kw)

    def encode_messages(self, messages: list[dict], **kw) -> EncodedSample:
        """Encodes chat messages (see ``message_turns``)."""
        turns, system = message_turns(messages)
        return self.encode_turns(turns, system=system, **kw)

    def collate(self, samples: list[EncodedSample], padding_side: str = "right") -> BatchFeature:
        """Pads samples into a batch: ``input_ids``, ``attention_mask``, ``labels`` and media tensors in
        placeholder order."""
        if not samples:
            raise UniMoeInputError("empty batch")
        width = max(len(s.input_ids) for s in samples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            span = slice(width - n, width) if padding_side == "left" else slice(0, n)
            ids[row, span] = torch.tensor(s.input_ids)
            labels[row, span] = torch.tensor(s.labels)
            mask[row, span] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for m in media():
            items = [t for s in samples for t in s.media[m.name]]
            if not items:
                continue
            batch[m.input_key] = torch.cat(items) if m.chunked else torch.stack(items)  # chunks join on dim 0
            if m.mask_key is not None:
                batch[m.mask_key] = torch.cat([t for s in samples for t in s.masks[m.name]])
        return BatchFeature(batch)

    def __call__(
        self,
        conversations: list,
        *,
        add_generation_prompt: bool = False,
        media_root: str | Path | None = None,
        padding_side: str | None = None,
    ) -> BatchFeature:
        """Encodes a batch of records (release format) or chat-message lists."""
        samples = [
            self.encode_record(c, media_root, add_generation_prompt=add_generation_prompt)
            if isinstance(c, dict)
            else self.encode_messages(c, media_root=media_root, add_generation_prompt=add_generation_prompt)
            for c in conversations
        ]
        side = padding_side or ("left" if add_generation_prompt else "right")
        return self.collate(samples, side)

    def apply_chat_template(
        self,
        messages: list,
        *,
        tokenize: bool = True,
        return_dict: bool = True,
        return_tensors: str | None = "pt",
        add_generation_prompt: bool = False,
        media_root: str | Path | None = None,
    ) -> BatchFeature | str | list[str]:
        """Like transformers' multimodal processors: chat messages (or a batch of them) to model inputs.

        With ``tokenize=False`` returns the rendered prompt text with one placeholder per media item.
        """
        batched = bool(messages) and isinstance(messages[0], list)
        batch = messages if batched else [messages]
        if not tokenize:
            texts = [self.render(m, add_generation_prompt) for m in batch]
            return texts if batched else texts[0]
        if return_tensors not in ("pt", None):
            raise ValueError("only return_tensors='pt' is supported")
        out = self(batch, add_generation_prompt=add_generation_prompt, media_root=media_root)
        if not add_generation_prompt:
            return out if return_dict else out["input_ids"]
        out = BatchFeature({k: v for k, v in out.items() if k != "labels"})
        return out if return_dict else out["input_ids"]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The prompt text of chat messages, media shown as placeholders."""
        turns, system = message_turns(messages)
        pieces = []
        for part, _ in render_template(turns, system or self.settings.system_prompt, add_generation_prompt):
            pieces.append(part if isinstance(part, str) else "</s>" if part is None else f"<{part[0]}>")
        return "".join(pieces)

    def decode(self, token_ids, **kw) -> str:
        """Text of generated token ids, special tokens dropped and whitespace stripped."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, **kw).strip()

    def batch_decode(self, sequences, **kw) -> list[str]:
        """``decode`` for each row."""
        return [self.decode(s, **kw) for s in sequences]


def _pad_to_square(image, mean: list[float]):
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas

"""``UniMoeEngine``: the one inference object that chat, batch generation and the server adapt.

It encodes conversations (chat messages or release records) with the processor, left-pads them into
one batch and calls ``model.generate`` with the KV cache. Sampling parameters, stop strings and
token limits are per row, so requests with different settings can share a batch; a seed fixes a
row's sampled text whatever else is in its batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..errors import UniMoeInputError
from ..processing.conversation import strip_answer
from ..processing.processor import EncodedSample, UniMoeProcessor
from .decoding import RowSampler, RowStops, StreamDetokenizer, byte_token_ids, finish_text

Conversation = list[dict[str, Any]] | dict[str, Any]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class GenerationParams:
    """How to generate one answer.

    ``temperature`` 0 means greedy decoding. ``stop`` strings end the answer at the first occurrence
    (the stop string itself is not returned). With the same ``seed`` a sampled answer is the same.
    ``ignore_eos`` never ends the answer at end-of-sequence, so that exactly ``max_new_tokens`` are
    generated (for benchmarks).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UniMoeInputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise UniMoeInputError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise UniMoeInputError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class Result:
    """One generated answer: its text, token counts and why generation ended (``"stop"`` at an
    end-of-sequence token or a stop string, ``"length"`` at the token limit)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    token_ids: list[int] = field(default_factory=list, repr=False)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on GPUs that support it, else float16 on GPU; float32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def worker_threads(engine, threads: int | None) -> int | None:
    """Intra-op threads for a decoding worker thread: ``threads``, or on CPU 1 (None: leave as is).

    On CPU a second thread that runs torch gets an OpenMP team of its own, which competes with the
    main thread's for the cores: measured here (2 cores) a tiny model decodes 3-4x slower in a worker
    thread with 2 intra-op threads than with 1, and a mid-size one (LLM hidden 512) equally fast with
    1 and 2. On GPU the host threads do not matter.
    """
    if threads is not None:
        return threads
    device = getattr(engine, "device", None)
    return 1 if device is not None and torch.device(device).type == "cpu" else None


class UniMoeEngine:
    """Batched, streamed text generation with a ``UniMoeForConditionalGeneration`` and its processor."""

    def __init__(self, model, processor: UniMoeProcessor, name: str = "unimoe"):
        self.model = model.eval()
        self.processor = processor
        self.name = name
        self.device = next(model.parameters()).device
        self.max_positions = model.config.text_config.max_position_embeddings
        self.byte_ids = byte_token_ids(processor.tokenizer)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str = "tiny", device: str = "auto", dtype: str = "auto") -> UniMoeEngine:
        """An engine for ``"tiny"`` (random tiny preset, no weights needed) or a model directory that
        holds the model and processor files side by side."""
        from ..modeling.modeling_unimoe import UniMoeForConditionalGeneration
        from ..presets import build_tiny

        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        if model == "tiny":
            net, processor = build_tiny()
            name = "tiny"
        else:
            path = Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"model directory not found: {path}")
            net = UniMoeForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
            processor = UniMoeProcessor.from_pretrained(path)
            name = path.resolve().name
        return cls(net.to(torch_device, torch_dtype), processor, name=name)

    @property
    def default_voice_modality(self) -> str:
        """The encoder that unlabelled voice input goes to: speech if the model has one, else audio."""
        return self.processor.settings.voice_modality

    def encode(self, conversation: Conversation, media_root: str | Path | None = None) -> EncodedSample:
        """Tokenises a prompt (chat messages or a release record) and featurises its media."""
        if isinstance(conversation, Mapping):
            record = strip_answer(conversation)
            return self.processor.encode_record(record, media_root, add_generation_prompt=True)
        if not isinstance(conversation, list) or not conversation:
            raise UniMoeInputError("a conversation must be a non-empty list of messages or a record")
        messages = strip_answer(conversation)
        return self.processor.encode_messages(messages, media_root=media_root, add_generation_prompt=True)

    def generate(
        self,
        conversations: Sequence[Conversation],
        params: GenerationParams | Sequence[GenerationParams] | None = None,
        media_root: str | Path | None = None,
    ) -> list[Result]:
        """Answers every conversation in one batch; ``params`` is shared or one per conversation."""
        samples = [self.encode(c, media_root) for c in conversations]
        return self.generate_encoded(samples, params)

    def generate_encoded(
        self,
        samples: Sequence[EncodedSample],
        params: GenerationParams | Sequence[GenerationParams] | None = None,
        streamer=None,
    ) -> list[Result]:
        """Answers already encoded prompts in one batch. ``streamer``: a transformers streamer that
        receives the prompt ids, then each step's new token per row (``[rows]``)."""
        rows = self._row_params(params, len(samples))
        return self._run(list(samples), rows, streamer)

    def stream(
        self,
        conversation: Conversation,
        params: GenerationParams | None = None,
        media_root: str | Path | None = None,
    ) -> TextStream:
        """Text deltas of one answer as they are generated; they join to the text ``generate`` gives
        for the same conversation and params. The final ``Result`` is on the stream once exhausted."""
        return self.stream_encoded(self.encode(conversation, media_root), params)

    def stream_encoded(self, sample: EncodedSample, params: GenerationParams | None = None) -> TextStream:
        """``stream`` for an already encoded prompt."""
        return TextStream(self, sample, params or GenerationParams())

    def token_limits(self, samples: list[EncodedSample], rows: list[GenerationParams]) -> list[int]:
        """Per-row new-token limits, cut to what fits in the model's context."""
        limits = []
        for i, (sample, p) in enumerate(zip(samples, rows)):
            room = self.max_positions - len(sample.input_ids)
            if room < 1:
                raise UniMoeInputError(
                    f"prompt {i}: {len(sample.input_ids)} tokens leave no room in the model's "
                    f"context of {self.max_positions}"
                )
            limits.append(min(p.max_new_tokens, room))
        return limits

    # internals ---------------------------------------------------------------------------------

    @staticmethod
    def _row_params(params, count: int) -> list[GenerationParams]:
        if params is None or isinstance(params, GenerationParams):
            return [params or GenerationParams()] * count
        rows = list(params)
        if len(rows) != count:
            raise ValueError(f"{len(rows)} GenerationParams for {count} conversations")
        return rows

    def _run(
        self,
        samples: list[EncodedSample],
        rows: list[GenerationParams],
        streamer=None,
        cancel: threading.Event | None = None,
    ) -> list[Result]:
        """One ``model.generate`` call over left-padded samples."""
        if not samples:
            return []
        limits = self.token_limits(samples, rows)
        batch = self.processor.collate(samples, padding_side="left")
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        prompt_len = batch["input_ids"].shape[1]
        tokenizer = self.processor.tokenizer
        stops = RowStops(tokenizer, prompt_len, limits, [p.stop for p in rows], cancel)
        sampler = RowSampler(rows, tokenizer.eos_token_id)
        with self._lock, torch.inference_mode():
            output = self.model.generate(
                **batch,
                max_new_tokens=max(limits),
                do_sample=False,
                logits_processor=[sampler],
                stopping_criteria=[stops],
                streamer=streamer,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        results = []
        for row, (sample, p) in enumerate(zip(samples, rows)):
            ids = output[row, prompt_len : prompt_len + stops.lengths[row]].tolist()
            text, stopped = finish_text(tokenizer, ids, p.stop)
            reason = "stop" if stopped or stops.reasons[row] == "stop" else "length"
            results.append(Result(text, len(sample.input_ids), len(ids), reason, ids))
        return results


class DeltaStream(Iterator[str]):
    """Iterator of the text deltas of one answer whose producer puts, on ``queue``: tensors of new
    token ids, then the final ``Result`` (or an exception), then ``END``.

    ``result`` holds the final ``Result`` once the iterator is exhausted.
    """

    def __init__(self, engine: UniMoeEngine, params: GenerationParams):
        self.result: Result | None = None
        self.queue: queue.Queue = queue.Queue()
        self.closed = threading.Event()  # set by ``close``: the producer may stop early
        self._detok = StreamDetokenizer(engine.processor.tokenizer, params.stop, engine.byte_ids)
        self._done = False

    def __next__(self) -> str:
        while not self._done:
            delta = self._take(self.queue.get())
            if delta:
                return delta
        raise StopIteration

    def _take(self, item: object) -> str:
        """The text delta an item from the worker brings (tokens, the result, an error or the end)."""
        if isinstance(item, torch.Tensor):
            return self._detok.push(item.view(-1).tolist())
        if isinstance(item, Result):
            self.result = item
            return self._detok.finish(item.text)
        self._done = True
        if isinstance(item, BaseException):
            raise item
        return ""

    def close(self) -> None:
        """Stops reading and tells the producer it may stop."""
        self.closed.set()
        self._done = True


END = object()


class TextStream(DeltaStream):
    """The text deltas of one answer, generated alone in a background thread; ``close()`` stops the
    generation early."""

    def __init__(self, engine: UniMoeEngine, sample: EncodedSample, params: GenerationParams):
        super().__init__(engine, params)
        self._engine = engine
        self._params = params
        self._cancel = threading.Event()
        engine.token_limits([sample], [params])  # raise on a too-long prompt before the thread starts
        self._thread = threading.Thread(target=self._work, args=(sample,), daemon=True)
        self._thread.start()

    def _work(self, sample: EncodedSample) -> None:
        threads = worker_threads(self._engine, None)
        if threads:
            torch.set_num_threads(threads)
        try:
            results = self._engine._run([sample], [self._params], RowStreamer([self.queue]), self._cancel)
            self.queue.put(results[0])
        except Exception as exc:  # handed to the consumer, which re-raises it
            self.queue.put(exc)
        self.queue.put(END)

    def close(self) -> None:
        """Stops generation (if still running) and waits for the worker thread."""
        self._cancel.set()
        super().close()
        self._thread.join()


class RowStreamer(BaseStreamer):
    """A ``generate`` streamer that hands each row's new token ids to that row's queue (``None``: a
    row nobody streams), skipping the prompt."""

    def __init__(self, sinks: Sequence[queue.Queue | None]):
        self._sinks = list(sinks)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        tokens = value.detach().cpu().view(len(self._sinks), -1)  # [rows, new]
        for sink, row in zip(self._sinks, tokens):
            if sink is not None:
                sink.put(row)

    def end(self) -> None:
        """Nothing to flush: the final text comes with the result."""

"""Continuous batching: requests join and leave the decoding batch at every step.

One worker thread owns a batch of rows, each a request being answered, that share one KV cache
(transformers' ``DynamicCache``, rows left-padded to a common length and masked). Every step it:

1. admits waiting requests (up to ``max_rows`` rows and ``max_tokens`` cached tokens): they are
   prefilled together, media encoded once, and their cache joins the batch's;
2. decodes one token for every row (each row with its own sampling settings, seed and stops);
3. retires finished rows at once (end-of-sequence, a stop string, the row's token limit, or a
   stream whose reader closed it), and drops cache columns no remaining row needs.

A request that arrives mid-answer waits at most one step, and short answers leave without waiting
for long ones. Results, streaming and errors look as with ``BatchScheduler``: ``submit`` gives a
future, ``stream`` an iterator of text deltas.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..compat import cache_kwargs
from ..processing.processor import EncodedSample
from .decoding import RowSampler, finish_text, first_stop
from .engine import DeltaStream, GenerationParams, Result, UniMoeEngine
from .scheduler import RequestQueue


@dataclass
class _Row:
    sample: EncodedSample
    params: GenerationParams
    future: Future = field(default_factory=Future)
    sink: queue.Queue | None = None
    closed: threading.Event | None = None  # a streamed answer nobody reads any more
    limit: int = 0
    sampler: RowSampler | None = None
    tokens: list[int] = field(default_factory=list)
    position: int = 0  # the position id of the row's next token
    reason: str | None = None


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class ContinuousBatcher(RequestQueue):
    """The step-level scheduler (module docstring); ``start`` runs its worker thread, or ``pump``
    drives it from the calling thread."""

    thread_name = "unimoe-continuous"

    def __init__(
        self,
        engine: UniMoeEngine,
        max_rows: int = 8,
        max_tokens: int = 16384,
        max_queue: int = 64,
        threads: int | None = None,
    ) -> None:
        if max_rows < 1 or max_tokens < 1:
            raise ValueError("max_rows and max_tokens must be positive")
        super().__init__(engine, max_queue, threads)
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.batch_sizes: list[int] = []  # rows decoded at each step
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cached tokens + 1 per step]
        self._next: torch.Tensor | None = None  # [rows] the token each row feeds next
        self._held: _Row | None = None  # admitted from the queue, waiting for room in the batch
        self._stop_seen = False

    def submit(self, sample: EncodedSample, params: GenerationParams) -> Future:
        """Queues a prompt; the future resolves to its ``Result``. Raises ``QueueFullError``."""
        return self._put(_Row(sample, params)).future

    def stream(self, sample: EncodedSample, params: GenerationParams) -> DeltaStream:
        """Queues a prompt whose answer streams as text deltas."""
        stream = DeltaStream(self.engine, params)
        self._put(_Row(sample, params, sink=stream.queue, closed=stream.closed))
        return stream

    def pump(self) -> bool:
        """One scheduling step in the calling thread, for a batcher run without ``start``: admits what
        waits and decodes one token per row. Returns whether anything is left to do."""
        if self._thread is not None:
            raise RuntimeError("pump() drives a batcher that has no worker thread")
        waiting = self._take_waiting(block=False)
        if waiting:
            self._admit(waiting)
        if self._rows:
            self._step()
        return bool(self._rows) or self.pending > 0

    # worker -------------------------------------------------------------------------------------

    def _put(self, row: _Row) -> _Row:
        row.limit = self.engine.token_limits([row.sample], [row.params])[0]  # too long: raises here
        return super()._put(row)

    def _loop(self) -> None:
        while True:
            waiting = self._take_waiting(block=not self._rows)
            if waiting is None and not self._rows:
                return
            if waiting:
                self._admit(waiting)
            if self._rows:
                self._step()

    def _take_waiting(self, block: bool) -> list[_Row] | None:
        """Requests to admit now, within the row and token budgets; None once stopping and idle. A
        request that does not fit is held (its future already running) and comes first next time."""
        rows = len(self._rows)
        cached = 0 if self._mask is None else int(self._mask.shape[1]) * rows
        taken: list[_Row] = []
        while rows + len(taken) < self.max_rows:
            if self._held is not None:
                row, self._held = self._held, None
            else:
                try:
                    wait = block and not taken and not rows and not self._stop_seen
                    row = self._queue.get() if wait else self._queue.get_nowait()
                except queue.Empty:
                    break
                if row is None:  # stop: once nothing is left
                    if not taken and not rows:
                        return None
                    self._stop_seen = True
                    break
                if not row.future.set_running_or_notify_cancel():
                    continue
            need = len(row.sample.input_ids) + row.limit
            if (taken or rows) and cached + need > self.max_tokens:
                self._held = row
                break
            cached += need
            taken.append(row)
        if self._stop_seen and not taken and not rows and self._held is None:
            return None
        return taken

    def _admit(self, rows: list[_Row]) -> None:
        """Prefills the newcomers together and joins their cache to the batch's."""
        engine = self.engine
        try:
            batch = engine.processor.collate([r.sample for r in rows], padding_side="left")
            batch = {k: v.to(engine.device) for k, v in batch.items() if k != "labels"}
            mask = batch["attention_mask"]
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            cache = DynamicCache()
            with engine._lock, torch.inference_mode():
                logits = engine.model(
                    **batch, position_ids=positions, use_cache=True, logits_to_keep=1, **cache_kwargs(cache)
                ).logits[:, -1]
        except Exception as exc:  # a bad request fails alone, the batch goes on
            if len(rows) > 1:
                for row in rows:
                    self._admit([row])
                return
            self._fail(rows[0], exc)
            return
        for i, row in enumerate(rows):
            row.position = int(mask[i].sum())
            row.sampler = RowSampler([row.params], engine.processor.tokenizer.eos_token_id)
        tokens = self._choose(rows, logits)
        self._join(rows, cache, mask, tokens)
        self._record(rows, tokens)

    def _join(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._next = list(rows), cache, mask, tokens
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, length, -2), _pad_left(new.keys, length, -2)])
            old.values = torch.cat([_pad_left(old.values, length, -2), _pad_left(new.values, length, -2)])
        self._mask = torch.cat([_pad_left(self._mask, length, 1), _pad_left(mask, length, 1)])
        self._next = torch.cat([self._next, tokens])
        self._rows.extend(rows)

    def _step(self) -> None:
        """One token for every row, then the finished rows leave."""
        engine = self.engine
        active = [r for r in self._rows if r.reason is None]
        if len(active) == len(self._rows):
            self.batch_sizes.append(len(self._rows))
            mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
            positions = torch.tensor([[r.position] for r in self._rows], device=engine.device)
            try:
                with engine._lock, torch.inference_mode():
                    logits = engine.model(
                        input_ids=self._next.unsqueeze(1),
                        attention_mask=mask,
                        position_ids=positions,
                        use_cache=True,
                        **cache_kwargs(self._cache),
                    ).logits[:, -1]
            except Exception as exc:  # the model failed: every row gets the error
                for row in self._rows:
                    self._fail(row, exc)
                self._reset()
                return
            self._mask = mask
            for row in self._rows:
                row.position += 1
            tokens = self._choose(self._rows, logits)
            self._next = tokens
            self._record(self._rows, tokens)
        self._retire()

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token: greedy rows by one argmax, the others by their own sampler."""
        tokens = logits.argmax(dim=-1)  # [rows]
        for i, row in enumerate(rows):
            if row.params.temperature > 0 or row.params.ignore_eos:
                tokens[i] = row.sampler(None, logits[i : i + 1]).argmax(dim=-1)[0]
        return tokens

    def _record(self, rows: list[_Row], tokens: torch.Tensor) -> None:
        tokenizer = self.engine.processor.tokenizer
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if row.reason is not None:
                continue
            if row.closed is not None and row.closed.is_set():
                row.reason = "length"  # the reader left: the row stops
                continue
            if token == tokenizer.eos_token_id and not row.params.ignore_eos:
                row.reason = "stop"
                continue
            row.tokens.append(token)
            if row.sink is not None:
                row.sink.put(torch.tensor([token]))
            if row.params.stop and first_stop(tokenizer.decode(row.tokens), row.params.stop) >= 0:
                row.reason = "stop"
            elif len(row.tokens) >= row.limit:
                row.reason = "length"

    def _retire(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.reason is None]
        if len(keep) == len(self._rows):
            return
        tokenizer = self.engine.processor.tokenizer
        for row in self._rows:
            if row.reason is not None:
                text, stopped = finish_text(tokenizer, row.tokens, row.params.stop)
                reason = "stop" if stopped or row.reason == "stop" else "length"
                self._finish(
                    row, Result(text, len(row.sample.input_ids), len(row.tokens), reason, row.tokens)
                )
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask, self._next = self._mask[index], self._next[index]
        first = int((self._mask.cumsum(dim=1) == 0).sum(dim=1).min())  # columns every row pads
        for layer in self._cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]
        self._mask = self._mask[:, first:]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._next = [], None, None, None

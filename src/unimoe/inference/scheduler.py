"""Dynamic batching for the server: concurrent requests share one ``engine.generate_encoded`` call.

Requests wait in a bounded queue. A worker thread takes the first waiting request, gathers whatever
else arrives within a short window (up to ``max_batch_size``), and runs them as one batch; requests
that arrive while a batch runs make up the next one.

Requests are not grouped by sampling parameters: the engine applies temperature, top-p, seed, stop
strings and token limits per row, so any requests can share a batch, and a seeded request gives the
same text whatever it is batched with. The price is that a batch runs until its longest row is done
(finished rows are padded); with small batches that costs less than running parameter groups one
after another.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..processing.processor import EncodedSample
from .engine import END, DeltaStream, GenerationParams, RowStreamer, UniMoeEngine, worker_threads


class QueueFullError(RuntimeError):
    """The request queue is full; the caller should retry later."""


@dataclass
class _Job:
    sample: EncodedSample
    params: GenerationParams
    future: Future = field(default_factory=Future)
    sink: queue.Queue | None = None  # a streamed job's token queue


class RequestQueue:
    """A bounded queue of requests and the worker thread that answers them (``_loop``, in subclasses).

    A request has a ``future`` and, when streamed, a ``sink`` queue for its tokens.
    """

    thread_name = "unimoe-worker"

    def __init__(self, engine: UniMoeEngine, max_queue: int, threads: int | None) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be positive")
        self.engine = engine
        self.threads = worker_threads(engine, threads)
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Starts the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_worker, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Lets the worker finish what it is answering and exit."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def pending(self) -> int:
        """Requests waiting for the worker."""
        return self._queue.qsize()

    def _run_worker(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # this thread's own OpenMP team
        self._loop()

    def _loop(self) -> None:
        raise NotImplementedError

    def _put(self, job):
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFullError(f"the request queue is full ({self._queue.maxsize} waiting)") from None
        return job

    @staticmethod
    def _finish(job, result) -> None:
        job.future.set_result(result)
        if job.sink is not None:
            job.sink.put(result)
            job.sink.put(END)

    @staticmethod
    def _fail(job, exc: Exception) -> None:
        job.future.set_exception(exc)
        if job.sink is not None:
            job.sink.put(exc)
            job.sink.put(END)


class BatchScheduler(RequestQueue):
    """Static batching: a window gathers queued requests into a batch that runs whole."""

    thread_name = "unimoe-batcher"

    def __init__(
        self,
        engine: UniMoeEngine,
        max_batch_size: int = 8,
        max_queue: int = 64,
        window_s: float = 0.005,
        threads: int | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be positive")
        super().__init__(engine, max_queue, threads)
        self.max_batch_size = max_batch_size
        self.window_s = window_s
        self.batch_sizes: list[int] = []

    def submit(self, sample: EncodedSample, params: GenerationParams) -> Future:
        """Queues an encoded prompt; the future resolves to its ``Result`` (or the engine's error).

        Raises ``QueueFullError`` when the queue is full.
        """
        return self._put(_Job(sample, params)).future

    def stream(self, sample: EncodedSample, params: GenerationParams) -> DeltaStream:
        """Queues an encoded prompt whose answer streams: the returned iterator yields text deltas
        as the batch it joins decodes (other requests share that batch). Raises ``QueueFullError``."""
        self.engine.token_limits([sample], [params])  # a too-long prompt fails here, not in a batch
        stream = DeltaStream(self.engine, params)
        self._put(_Job(sample, params, sink=stream.queue))
        return stream

    def _collect(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # keep the stop signal for the loop
                break
            batch.append(job)
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            if batch:
                self.batch_sizes.append(len(batch))
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        """Runs a batch; if it fails, runs its requests one by one so only a bad one fails."""
        sinks = [j.sink for j in batch]
        streaming = {"streamer": RowStreamer(sinks)} if any(s is not None for s in sinks) else {}
        try:
            results = self.engine.generate_encoded(
                [j.sample for j in batch], [j.params for j in batch], **streaming
            )
        except Exception as exc:  # every failure must reach the waiting requests, never kill the worker
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            for job in batch:
                self._run_one(job)
            return
        for job, result in zip(batch, results):
            self._finish(job, result)

    def _run_one(self, job: _Job) -> None:
        """A request alone (after its batch failed); a streamed one gets its whole answer at the end."""
        try:
            self._finish(job, self.engine.generate_encoded([job.sample], [job.params])[0])
        except Exception as exc:  # see _run
            self._fail(job, exc)

"""An OpenAI-compatible HTTP server over ``UniMoeEngine`` (FastAPI + uvicorn).

Routes: ``POST /v1/chat/completions`` (JSON or, with ``stream: true``, server-sent events),
``GET /v1/models`` and ``GET /health``. Requests, streamed or not, share the decoding batch of a
``ContinuousBatcher`` (joining and leaving at every step); with ``batching="static"`` a
``BatchScheduler`` gathers requests for a short window and runs each batch whole. Every error answers with an
OpenAI-style body ``{"error": {"message", "type", "code"}}``: bad input 400, a body over the size
limit 413, a full queue 503, a request over its time limit 504.

``timeout`` bounds the wait for a non-streaming answer; a stream, once started, runs until it ends or
the client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UniMoeInputError
from ..processing.processor import EncodedSample
from .continuous import ContinuousBatcher
from .engine import DeltaStream, UniMoeEngine
from .protocol import (
    ChatRequest,
    MediaPolicy,
    chunk_body,
    completion_body,
    completion_id,
    error_body,
    parse_request,
    to_unimoe_messages,
    usage,
)
from .scheduler import BatchScheduler, QueueFullError


@dataclass
class ServerConfig:
    """Server settings; see ``unimoe serve --help``."""

    host: str = "127.0.0.1"
    port: int = 8000
    media_root: str | None = None
    allow_remote_media: bool = False
    max_batch_size: int = 8
    max_queue: int = 64
    max_request_bytes: int = 32 * 1024 * 1024
    timeout: float = 300.0
    batch_window_ms: float = 5.0
    default_max_tokens: int = 512
    batching: str = "continuous"  # or "static": whole batches, as before continuous batching
    max_batch_tokens: int = 16384
    worker_threads: int | None = None  # intra-op threads of the decoding thread (None: 1 on CPU)


class ApiError(Exception):
    """An error answered with ``status`` and an OpenAI-style body."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse(error_body(message, kind, code), status_code=status)


class _Slots:
    """A counter of concurrent streams with an upper bound."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        with self._lock:
            if self.used >= self.limit:
                return False
            self.used += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.used -= 1


async def read_json(request: Request, limit: int) -> Any:
    """The request body parsed as JSON; 413 past ``limit`` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_events(stream: DeltaStream, model: str, include_usage: bool, release) -> Iterator[str]:
    """Server-sent events of a streamed answer, ending with ``data: [DONE]``."""
    chunk_id, created = completion_id(), int(time.time())
    try:
        yield _sse(chunk_body(chunk_id, model, {"role": "assistant", "content": ""}, created=created))
        for delta in stream:
            yield _sse(chunk_body(chunk_id, model, {"content": delta}, created=created))
        result = stream.result
        yield _sse(chunk_body(chunk_id, model, {}, result.finish_reason, created=created))
        if include_usage:
            yield _sse(
                {**chunk_body(chunk_id, model, {}, created=created), "choices": [], "usage": usage(result)}
            )
    except Exception as exc:  # the status line is already sent: report the failure in-band
        yield _sse(error_body(str(exc), "server_error"))
    finally:
        stream.close()
        release()
    yield "data: [DONE]\n\n"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(UniMoeInputError)
    async def input_error(_: Request, exc: UniMoeInputError):
        return _error(400, str(exc), code="invalid_input")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        return _error(400, str(exc.errors()), code="invalid_request")

    @app.exception_handler(Exception)
    async def server_error(_: Request, exc: Exception):
        return _error(500, f"{type(exc).__name__}: {exc}", "server_error")


class ChatService:
    """What the chat-completions route does, apart from HTTP: encode, queue or stream, answer."""

    def __init__(self, engine: UniMoeEngine, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        root = Path(config.media_root) if config.media_root else None
        self.policy = MediaPolicy(root, config.allow_remote_media)
        if config.batching == "continuous":
            self.scheduler = ContinuousBatcher(
                engine,
                config.max_batch_size,
                config.max_batch_tokens,
                config.max_queue,
                config.worker_threads,
            )
        elif config.batching == "static":
            self.scheduler = BatchScheduler(
                engine,
                config.max_batch_size,
                config.max_queue,
                config.batch_window_ms / 1000,
                config.worker_threads,
            )
        else:
            raise ValueError(f"batching must be 'continuous' or 'static', got {config.batching!r}")
        self.streams = _Slots(config.max_queue)

    def encode(self, chat: ChatRequest) -> EncodedSample:
        """Loads the request's media and encodes its prompt (blocking)."""
        voice = self.engine.default_voice_modality
        with tempfile.TemporaryDirectory(prefix="unimoe-media-") as tmpdir:
            messages = to_unimoe_messages(chat.messages, self.policy, voice, tmpdir)
            sample = self.engine.encode(messages)
        self.engine.token_limits([sample], [chat.params])
        return sample

    async def complete(self, chat: ChatRequest, sample: EncodedSample) -> JSONResponse:
        """A batched, non-streaming answer."""
        try:
            future = self.scheduler.submit(sample, chat.params)
        except QueueFullError as exc:
            raise ApiError(503, str(exc), "server_overloaded", "queue_full") from exc
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), self.config.timeout)
        except TimeoutError as exc:
            future.cancel()
            raise ApiError(504, f"no answer within {self.config.timeout:g} s", "timeout", "timeout") from exc
        return JSONResponse(completion_body(result, self.engine.name))

    def stream(self, chat: ChatRequest, sample: EncodedSample) -> StreamingResponse:
        """A streamed answer as server-sent events."""
        if not self.streams.acquire():
            raise ApiError(503, "too many concurrent streams", "server_overloaded", "queue_full")
        try:
            text_stream = self.scheduler.stream(sample, chat.params)  # streams share the batches
        except QueueFullError as exc:
            self.streams.release()
            raise ApiError(503, str(exc), "server_overloaded", "queue_full") from exc
        except Exception:
            self.streams.release()
            raise
        events = sse_events(text_stream, self.engine.name, chat.include_usage, self.streams.release)
        return StreamingResponse(events, media_type="text/event-stream")


def create_app(engine: UniMoeEngine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    config = config or ServerConfig()
    service = ChatService(engine, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        service.scheduler.start()
        yield
        service.scheduler.stop()

    app = FastAPI(title="Uni-MoE", lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, "queued": service.scheduler.pending}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": engine.name, "object": "model", "created": 0, "owned_by": "unimoe"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(await read_json(request, config.max_request_bytes), config.default_max_tokens)
        sample = await run_in_threadpool(service.encode, chat)
        if chat.stream:
            return service.stream(chat, sample)
        return await service.complete(chat, sample)

    return app


def serve(engine: UniMoeEngine, config: ServerConfig) -> None:
    """Runs the server until interrupted."""
    import uvicorn

    uvicorn.run(create_app(engine, config), host=config.host, port=config.port, log_level="info")

"""The OpenAI chat-completions wire format: requests in, Uni-MoE messages and params out, responses back.

Media arrive as content parts: ``image_url`` and ``video_url`` (``{"url": ...}`` with a ``data:`` URL,
a local path or ``file://`` URL under the media root, or an http(s) URL when remote media are
allowed) and ``input_audio`` (``{"data": base64, "format": "wav", "modality": "speech"|"audio"}``,
``modality`` being our extension that picks the encoder). Every malformed field raises
``UniMoeInputError`` naming it.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx

from ..errors import UniMoeInputError
from .engine import GenerationParams, Result

VIDEO_SUFFIXES = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "video/x-matroska": ".mkv",
}
MAX_STOP_STRINGS = 4


@dataclass
class MediaPolicy:
    """Where media may come from: a folder of local files (``media_root``; none: no local files) and,
    when ``allow_remote``, http(s) URLs of at most ``max_remote_bytes``."""

    media_root: Path | None = None
    allow_remote: bool = False
    max_remote_bytes: int = 64 * 1024 * 1024
    remote_timeout: float = 10.0

    def local_path(self, raw: str, name: str) -> Path:
        """A path under the media root, symlinks and ``..`` resolved first; anything else is refused."""
        if self.media_root is None:
            raise UniMoeInputError(f"{name}: local file paths are disabled (the server has no --media-root)")
        root = os.path.realpath(self.media_root)
        real = os.path.realpath(os.path.join(root, raw))
        if os.path.commonpath([root, real]) != root:
            raise UniMoeInputError(f"{name}: path {raw!r} is outside the media root")
        if not os.path.isfile(real):
            raise UniMoeInputError(f"{name}: file {raw!r} not found under the media root")
        return Path(real)

    def fetch(self, url: str, name: str) -> bytes:
        """The body of an http(s) URL, if remote media are allowed."""
        if not self.allow_remote:
            raise UniMoeInputError(
                f"{name}: remote media URLs are disabled (start the server with --allow-remote-media)"
            )
        try:
            with httpx.stream("GET", url, timeout=self.remote_timeout, follow_redirects=True) as response:
                response.raise_for_status()
                body = bytearray()
                for chunk in response.iter_bytes():
                    body.extend(chunk)
                    if len(body) > self.max_remote_bytes:
                        raise UniMoeInputError(f"{name}: {url} is larger than {self.max_remote_bytes} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise UniMoeInputError(f"{name}: cannot fetch {url}: {exc}") from exc

    def resolve(self, url: str, name: str) -> tuple[bytes | Path, str | None]:
        """The media bytes or local path a URL stands for, and its MIME type when a data URL gives one."""
        if url.startswith("data:"):
            header, sep, payload = url[5:].partition(",")
            if not sep or not header.endswith(";base64"):
                raise UniMoeInputError(f"{name}: data URLs must be base64 encoded ('data:<type>;base64,...')")
            return decode_base64(payload, name), header.removesuffix(";base64") or None
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            return self.fetch(url, name), None
        if scheme == "file":
            return self.local_path(unquote(urlparse(url).path), name), None
        if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
            raise UniMoeInputError(f"{name}: unsupported URL scheme {scheme!r}")
        return self.local_path(url, name), None


def decode_base64(payload: str, name: str) -> bytes:
    """Strict base64 decoding; whitespace is ignored, anything else invalid is an error."""
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UniMoeInputError(f"{name}: invalid base64 data") from exc
    if not data:
        raise UniMoeInputError(f"{name}: empty media data")
    return data


@dataclass
class ChatRequest:
    """A validated chat-completions request; ``messages`` are still in OpenAI form."""

    messages: list
    params: GenerationParams
    stream: bool = False
    include_usage: bool = False


def _number(body: Mapping, key: str, default: float, kind: type = float) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (kind is int and value != int(value))
    ):
        raise UniMoeInputError(
            f"'{key}' must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        )
    return kind(value)


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise UniMoeInputError("'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise UniMoeInputError(f"'stop' takes at most {MAX_STOP_STRINGS} strings")
    return tuple(stops)


def parse_request(body: Any, default_max_tokens: int) -> ChatRequest:
    """Validates a request body: ``messages``, ``max_tokens`` / ``max_completion_tokens``,
    ``temperature`` (default 1, as OpenAI's), ``top_p``, ``stop``, ``seed``, ``n`` (1 only),
    ``stream`` and ``stream_options``. Other fields are ignored, ``model`` included: the server
    serves one model."""
    if not isinstance(body, Mapping):
        raise UniMoeInputError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UniMoeInputError("'messages' is required and must be a non-empty list")
    if _number(body, "n", 1, int) != 1:
        raise UniMoeInputError("'n' must be 1: one choice per request")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UniMoeInputError(f"'seed' must be an integer, got {seed!r}")
    params = GenerationParams(
        max_new_tokens=_number(body, key, default_max_tokens, int),
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        stop=_stop_strings(body.get("stop")),
        seed=seed,
    )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise UniMoeInputError("'stream' must be a boolean")
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, Mapping) else False
    return ChatRequest(messages, params, stream, include_usage)


def _text_of(content: Any, name: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise UniMoeInputError(f"{name}: content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise UniMoeInputError(f"{name}.content[{j}]: only text parts are allowed in this message")
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def _url_of(part: Mapping, key: str, name: str) -> str:
    value = part.get(key)
    url = value.get("url") if isinstance(value, Mapping) else value
    if not isinstance(url, str) or not url:
        raise UniMoeInputError(f"{name}: '{key}' needs a 'url' string")
    return url


def _as_file(source: bytes | Path, mime: str | None, tmpdir: str) -> Path:
    """Video loaders read files: bytes are written to a new file in ``tmpdir``."""
    if isinstance(source, Path):
        return source
    suffix = VIDEO_SUFFIXES.get(mime or "", ".mp4")
    with tempfile.NamedTemporaryFile(dir=tmpdir, suffix=suffix, delete=False) as file:
        file.write(source)
    return Path(file.name)


def _media_part(part: Mapping, name: str, policy: MediaPolicy, voice: str, tmpdir: str) -> dict:
    kind = part.get("type")
    if kind == "image_url":
        source, _ = policy.resolve(_url_of(part, "image_url", name), name)
        return {"type": "image", "image": source}
    if kind == "video_url":
        source, mime = policy.resolve(_url_of(part, "video_url", name), name)
        return {"type": "video", "video": str(_as_file(source, mime, tmpdir))}
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, Mapping) or not isinstance(audio.get("data"), str):
            raise UniMoeInputError(f"{name}: 'input_audio' needs base64 'data'")
        modality = audio.get("modality", voice)
        if modality not in ("speech", "audio"):
            raise UniMoeInputError(
                f"{name}: input_audio 'modality' must be 'speech' or 'audio', got {modality!r}"
            )
        return {"type": modality, modality: decode_base64(audio["data"], name)}
    raise UniMoeInputError(f"{name}: unknown content part type {kind!r}")


def to_unimoe_messages(messages: list, policy: MediaPolicy, voice: str, tmpdir: str) -> list[dict]:
    """OpenAI messages to Uni-MoE chat messages with media loaded (videos as files in ``tmpdir``)."""
    out = []
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise UniMoeInputError(f"{name}: a message needs a 'role' and 'content'")
        role = "system" if message["role"] == "developer" else message["role"]
        if role not in ("system", "user", "assistant"):
            raise UniMoeInputError(f"{name}: unsupported role {role!r}")
        content = message.get("content")
        if role != "user" or not isinstance(content, list):
            out.append({"role": role, "content": _text_of(content, name)})
            continue
        parts = []
        for j, part in enumerate(content):
            part_name = f"{name}.content[{j}]"
            if not isinstance(part, Mapping):
                raise UniMoeInputError(f"{part_name}: a content part must be an object")
            if part.get("type") == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            else:
                parts.append(_media_part(part, part_name, policy, voice, tmpdir))
        out.append({"role": role, "content": parts})
    return out


# responses ---------------------------------------------------------------------------------------


def completion_id() -> str:
    """A fresh ``chatcmpl-`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(result: Result) -> dict[str, int]:
    """OpenAI usage counts of a result."""
    total = result.prompt_tokens + result.completion_tokens
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": total,
    }


def completion_body(result: Result, model: str) -> dict[str, Any]:
    """A ``chat.completion`` response."""
    return {
        "id": completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
    }


def chunk_body(
    chunk_id: str, model: str, delta: dict, finish_reason: str | None = None, created: int | None = None
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of a streamed response."""
    return {
        "id": chunk_id,
        "object": "chat.completion.chunk",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}

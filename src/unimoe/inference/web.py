"""``unimoe web``: a Gradio chat page on the inference engine (``pip install unimoe[web]``).

Uploads (images, videos, audio files, microphone recordings) and text become one chat message; an
audio file goes to the speech encoder (Whisper) or the audio encoder (BEATs) as the page's control
says. Every request joins the decoding batch of a ``ContinuousBatcher`` (as in ``unimoe serve``), so
several users share each decoding step, and replies stream token by token. A bad upload shows an error on the page and
nothing else changes. Uploads are kept in a temporary folder of the run and limited in size; the
page binds to 127.0.0.1 unless told otherwise.

Placeholders typed in the text (``<image>``, ``<speech>`` ...) place the uploads in it, in order;
without them the uploads come first, then the text on a new line, as in the release's data.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UniMoeInputError
from ..modalities import MODALITIES, media_names, placeholder_pattern
from .continuous import ContinuousBatcher
from .engine import GenerationParams, UniMoeEngine
from .scheduler import QueueFullError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac"}
VOICE_KINDS = ("speech", "audio")
ERROR_PREFIX = "Error: "  # how the page answers a message it cannot read


@dataclass
class WebSettings:
    """How ``unimoe web`` serves: address, upload limit, batching, and example records."""

    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: float = 25.0
    max_batch_size: int = 8
    examples: Path | None = None
    media_root: Path | None = None
    max_examples: int = 6


def media_kind(path: str | Path, voice: str) -> str:
    """The modality of an uploaded file, from its suffix; audio goes to ``voice`` (speech or audio)."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    if suffix in AUDIO_SUFFIXES:
        return voice
    raise UniMoeInputError(f"{Path(path).name}: not an image, video or audio file this page reads")


def _file_path(item: Any) -> str | None:
    """The path of an uploaded file in any of the shapes Gradio hands over."""
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, dict):
        if isinstance(item.get("file"), dict):
            return item["file"].get("path")
        return item.get("path")
    return getattr(item, "path", None)


def user_content(text: str, files: Sequence[str], voice: str) -> list[dict]:
    """One user message's content parts from its text and uploads (module docstring)."""
    media = [(media_kind(f, voice), str(f)) for f in files]
    if not media:
        return [{"type": "text", "text": text}]
    parts: list[dict] = []
    placeholders = list(placeholder_pattern().finditer(text))
    if not placeholders:
        parts = [{"type": kind, "path": path} for kind, path in media]
        return parts + ([{"type": "text", "text": "\n" + text}] if text else [])
    remaining = list(media)
    position = 0
    for match in placeholders:
        name = match.group(1)
        wanted = VOICE_KINDS if name in VOICE_KINDS else (name,)
        index = next((i for i, (kind, _) in enumerate(remaining) if kind in wanted), None)
        if index is None:
            raise UniMoeInputError(f"the text has <{name}> but no matching file was uploaded")
        if match.start() > position:
            parts.append({"type": "text", "text": text[position : match.start()]})
        parts.append({"type": name, "path": remaining.pop(index)[1]})
        position = match.end()
    if remaining:
        raise UniMoeInputError(f"{len(remaining)} uploaded file(s) have no placeholder in the text")
    if position < len(text):
        parts.append({"type": "text", "text": text[position:]})
    return parts


def chat_messages(message: dict, history: Sequence[dict], voice: str) -> list[dict]:
    """Our chat messages from Gradio's multimodal message (``{"text", "files"}``) and history (one
    entry per text or file, consecutive entries of a role forming one turn)."""
    turns: list[tuple[str, list[str], list[str]]] = []  # role, texts, files
    for entry in history:
        role = entry.get("role") if isinstance(entry, dict) else getattr(entry, "role", None)
        content = entry.get("content") if isinstance(entry, dict) else getattr(entry, "content", None)
        if role not in ("user", "assistant"):
            continue
        if not turns or turns[-1][0] != role:
            turns.append((role, [], []))
        for item in content if isinstance(content, list) else [content]:
            path = None if isinstance(item, str) else _file_path(item)
            if path is not None:
                turns[-1][2].append(path)
            elif isinstance(item, dict) and item.get("type") == "text":
                turns[-1][1].append(item.get("text", ""))
            elif isinstance(item, str):
                turns[-1][1].append(item)

    def failed(turn) -> bool:
        return turn[0] == "assistant" and "\n".join(turn[1]).startswith(ERROR_PREFIX)

    messages = []
    for i, (role, texts, files) in enumerate(turns):
        if failed(turns[i]) or (i + 1 < len(turns) and failed(turns[i + 1])):
            continue  # an exchange that failed (a bad upload) is not context
        text = "\n".join(texts)
        content = user_content(text, files, voice) if role == "user" else text
        messages.append({"role": role, "content": content})
    files = [p for p in (_file_path(f) for f in message.get("files") or []) if p]
    messages.append({"role": "user", "content": user_content(message.get("text") or "", files, voice)})
    return messages


class WebChat:
    """The page's server side: one answer at a time per user, through the shared batch scheduler."""

    def __init__(self, engine: UniMoeEngine, scheduler: ContinuousBatcher):
        self.engine = engine
        self.scheduler = scheduler

    def reply(
        self,
        message: dict,
        history: Sequence[dict],
        voice: str,
        temperature: float,
        top_p: float,
        max_tokens: int,
    ) -> Iterator[str]:
        """The growing answer text (what the page shows as it streams). Raises ``UniMoeInputError``
        for a message the engine cannot read."""
        if voice not in VOICE_KINDS:
            raise UniMoeInputError(f"voice must be one of {VOICE_KINDS}, got {voice!r}")
        sample = self.engine.encode(chat_messages(message, history, voice))
        params = GenerationParams(
            max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p)
        )
        try:
            stream = self.scheduler.stream(sample, params)
        except QueueFullError as err:
            raise UniMoeInputError("the server is busy; try again in a moment") from err
        text = ""
        for delta in stream:
            text += delta
            yield text
        if not text:
            yield stream.result.text if stream.result else ""


def example_messages(path: Path, media_root: Path | None, limit: int) -> list[dict]:
    """Multimodal example messages from release-format records (one per task, the first ``limit``)."""
    records = json.loads(Path(path).read_text())
    root = Path(media_root) if media_root else Path(path).parent
    examples, tasks = [], set()
    for record in records:
        task = record.get("task", record.get("id"))
        if task in tasks or len(examples) >= limit:
            continue
        tasks.add(task)
        files = []
        for name in media_names():
            for item in record.get(name) if isinstance(record.get(name), list) else [record.get(name)]:
                if isinstance(item, str):
                    files.append(str(root / item))
        text = record["conversations"][0]["value"]
        examples.append({"text": text, "files": files})
    return examples


def build_app(engine: UniMoeEngine, scheduler: ContinuousBatcher, settings: WebSettings):
    """The Gradio page."""
    import gradio as gr

    chat = WebChat(engine, scheduler)

    def respond(message, history, voice, temperature, top_p, max_tokens):
        try:
            yield from chat.reply(message, history, voice, temperature, top_p, max_tokens)
        except UniMoeInputError as err:  # shown, and the page goes on (a raised gr.Error locks the textbox)
            text = str(err)
            for item in message.get("files") or []:
                path = _file_path(item)
                if path:
                    text = text.replace(path, Path(path).name)  # the upload's name, not its temp path
            gr.Warning(text)
            yield ERROR_PREFIX + text

    voice = gr.Radio(list(VOICE_KINDS), value=engine.default_voice_modality, label="Audio uploads go to")
    controls = [
        voice,
        gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p"),
        gr.Slider(1, 1024, value=128, step=1, label="Max new tokens"),
    ]
    examples = None
    if settings.examples is not None:
        messages = example_messages(settings.examples, settings.media_root, settings.max_examples)
        examples = [[m, engine.default_voice_modality, 0.0, 1.0, 32] for m in messages]
    kinds = sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES | AUDIO_SUFFIXES)
    textbox = gr.MultimodalTextbox(
        file_types=kinds,
        file_count="multiple",
        sources=["upload", "microphone"],
        placeholder="Ask about an image, a video, speech or a sound (placeholders such as <image> are optional)",
    )
    names = ", ".join(m for m in MODALITIES)
    return gr.ChatInterface(
        respond,
        multimodal=True,
        textbox=textbox,
        chatbot=gr.Chatbot(label=f"Uni-MoE ({engine.name})", height=480),
        additional_inputs=controls,
        additional_inputs_accordion=gr.Accordion("Settings", open=True),
        examples=examples,
        cache_examples=False,
        title="Uni-MoE",
        description=f"A unified multimodal MoE model ({names}). Upload media, ask, and the answer streams.",
        concurrency_limit=None,
        fill_height=True,
    )


def serve_web(engine: UniMoeEngine, settings: WebSettings) -> None:
    """Runs the page until interrupted. Uploads go to a temporary folder removed at exit."""
    uploads = tempfile.TemporaryDirectory(prefix="unimoe-web-")
    os.environ["GRADIO_TEMP_DIR"] = uploads.name  # read when gradio is imported, below
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
    scheduler = ContinuousBatcher(engine, max_rows=settings.max_batch_size)
    scheduler.start()
    try:
        app = build_app(engine, scheduler, settings)
        allowed = [str(settings.media_root or Path(settings.examples).parent)] if settings.examples else []
        app.queue(default_concurrency_limit=None).launch(
            server_name=settings.host,
            server_port=settings.port,
            max_file_size=int(settings.max_upload_mb * 1024 * 1024),
            allowed_paths=allowed,
            show_error=True,
            share=False,
        )
    finally:
        scheduler.stop()
        uploads.cleanup()

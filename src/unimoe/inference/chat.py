"""Interactive terminal chat over ``UniMoeEngine``, with streamed answers and media attachments.

Lines starting with ``/`` are commands: ``/image PATH [text]``, ``/video PATH [text]``,
``/speech PATH [text]``, ``/audio PATH [text]`` attach a file to the next user message (sent at once
when text follows the path), ``/reset`` forgets the conversation, ``/help`` lists the commands and
``/quit`` (or end of input) leaves. Any other line is a user message.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ..errors import UniMoeInputError
from ..modalities import media_names
from .engine import GenerationParams, UniMoeEngine

HELP = """Commands:
  /image PATH [text]   attach an image (also /video, /speech, /audio); with text, send at once
  /reset               start a new conversation
  /help                show this help
  /quit                leave (as does end of input)"""


@dataclass
class ChatSession:
    """The conversation so far and the attachments waiting for the next user message."""

    system: str | None = None
    history: list[dict] = field(default_factory=list)
    attachments: list[dict] = field(default_factory=list)

    def reset(self) -> None:
        """Forgets the conversation and pending attachments."""
        self.history.clear()
        self.attachments.clear()

    def user_message(self, text: str) -> dict:
        """A user message of the pending attachments and ``text``; clears the attachments."""
        content = [*self.attachments, {"type": "text", "text": text}]
        self.attachments = []
        return {"role": "user", "content": content}

    def conversation(self, message: dict) -> list[dict]:
        """The messages to answer: system prompt, history and ``message``."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, message]


def split_path(rest: str) -> tuple[str, str]:
    """``'PATH text'`` or ``'"a path" text'`` -> ``(path, text)``."""
    rest = rest.strip()
    if rest[:1] in ("'", '"'):
        lexer = shlex.shlex(rest, posix=True)
        lexer.whitespace_split = True
        path = lexer.get_token() or ""
        return path, lexer.instream.read().strip()
    path, _, text = rest.partition(" ")
    return path, text.strip()


def _attach(session: ChatSession, modality: str, rest: str, out: TextIO) -> str:
    """Queues an attachment; returns the text to send with it now (empty: wait for a message)."""
    path, text = split_path(rest)
    if not path:
        out.write(f"usage: /{modality} PATH [text]\n")
        return ""
    if not Path(path).expanduser().is_file():
        out.write(f"error: file not found: {path}\n")
        return ""
    session.attachments.append({"type": modality, "path": str(Path(path).expanduser())})
    if not text:
        out.write(f"[{modality} attached: {path}]\n")
    return text


def respond(
    engine: UniMoeEngine, session: ChatSession, text: str, params: GenerationParams, out: TextIO
) -> None:
    """Streams the answer to ``text`` (plus pending attachments) and records the turn."""
    message = session.user_message(text)
    try:
        stream = engine.stream(session.conversation(message), params)
        for delta in stream:
            out.write(delta)
            out.flush()
    except UniMoeInputError as exc:
        out.write(f"error: {exc}\n")
        return
    out.write("\n")
    out.flush()
    session.history += [message, {"role": "assistant", "content": stream.result.text}]


def _command(engine, session, line: str, params: GenerationParams, out: TextIO) -> bool:
    """Runs a ``/command``; returns False when the chat should end."""
    name, _, rest = line[1:].partition(" ")
    if name in ("quit", "exit"):
        return False
    if name == "reset":
        session.reset()
        out.write("[conversation reset]\n")
    elif name == "help":
        out.write(HELP + "\n")
    elif name in media_names():
        text = _attach(session, name, rest, out)
        if text:
            respond(engine, session, text, params, out)
    else:
        out.write(f"unknown command /{name}; /help lists the commands\n")
    return True


def chat_loop(
    engine: UniMoeEngine,
    params: GenerationParams,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    system: str | None = None,
) -> ChatSession:
    """Reads lines from ``stdin`` until ``/quit`` or end of input, answering each user message."""
    stdin, out = stdin or sys.stdin, stdout or sys.stdout
    session = ChatSession(system=system)
    interactive = stdin.isatty()
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(engine, session, line, params, out):
                break
            continue
        respond(engine, session, line, params, out)
    return session

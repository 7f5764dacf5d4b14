"""Conversations: the Vicuna v1 template, and turning release records or chat messages into turns.

A turn is ``(role, parts)`` with role ``"user"`` or ``"assistant"`` and parts that are either text or
``(modality, source)`` media items, in prompt order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UniMoeInputError
from ..modalities import MODALITIES, media_names, placeholder_pattern

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VOICE_KEY = "voice"  # the release's record key for audio files that feed <audio> or <speech> placeholders
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

Part = str | tuple[str, Any]
Turn = tuple[str, list[Part]]


def render_template(turns: Sequence[Turn], system: str = SYSTEM_PROMPT, add_generation_prompt: bool = False):
    """Vicuna v1: ``SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:``.

    Yields ``(part, supervised)`` pairs where a part is text, a media item, or ``None`` for
    end-of-sequence; only assistant answers (and their ``</s>``) are supervised.
    """
    yield system + " ", False
    for role, parts in turns:
        if role == "user":
            yield "USER: ", False
            yield from ((p, False) for p in parts)
            yield " ", False
        else:
            yield "ASSISTANT:", False
            yield from ((p, True) for p in parts)
            yield None, True
    if add_generation_prompt:
        yield "ASSISTANT:", False


_TEMPLATE = """\
{%- set ns = namespace(system='') -%}
{%- for message in messages if message.role == 'system' -%}
  {%- if message.content is string -%}{%- set ns.system = message.content -%}
  {%- else -%}{%- set ns.system = message.content | map(attribute='text', default='') | join(' ') -%}{%- endif -%}
{%- endfor -%}
{{- (ns.system or SYSTEM) ~ ' ' -}}
{%- for message in messages if message.role != 'system' -%}
  {%- if message.role in ('user', 'human') -%}{{- 'USER: ' -}}
  {%- elif message.role in ('assistant', 'gpt') -%}{{- 'ASSISTANT:' -}}
  {%- else -%}{{- raise_exception('unknown role ' ~ message.role) -}}{%- endif -%}
  {%- if message.content is string -%}{{- message.content -}}
  {%- else -%}{%- for part in message.content -%}
    {%- if part.type == 'text' -%}{{- part.text -}}{%- else -%}{{- '<' ~ part.type ~ '>' -}}{%- endif -%}
  {%- endfor -%}{%- endif -%}
  {%- if message.role in ('user', 'human') -%}{{- ' ' -}}{%- else -%}{{- '</s>' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""


def chat_template(system: str = SYSTEM_PROMPT) -> str:
    """``render_template`` as a Jinja chat template (transformers' ``apply_chat_template`` format), so
    that tools reading only the tokenizer render the same prompt text, media shown as ``<image>``,
    ``<speech>``, ... placeholders."""
    return _TEMPLATE.replace("SYSTEM", json.dumps(system), 1)


def _is_answer(turn: Any, key: str) -> bool:
    return isinstance(turn, Mapping) and _ROLES.get(turn.get(key)) == "assistant"


def strip_answer(conversation: Mapping[str, Any] | Sequence[Mapping[str, Any]]):
    """The prompt part of a conversation: trailing assistant turns dropped, from a release-format record
    (its ``conversations``, a copy of the record comes back) or from a list of chat messages."""
    if isinstance(conversation, Mapping):
        turns = list(conversation.get("conversations") or [])
        while turns and _is_answer(turns[-1], "from"):
            turns.pop()
        return {**conversation, "conversations": turns}
    messages = list(conversation)
    while messages and _is_answer(messages[-1], "role"):
        messages.pop()
    return messages


def record_media_keys() -> list[str]:
    """Record keys that hold media: one per modality, and the release's ``voice``."""
    return [*media_names(), VOICE_KEY]


def _role(raw: str, name: str) -> str:
    if raw not in _ROLES:
        raise UniMoeInputError(f"{name}: unknown role {raw!r} (expected one of {sorted(_ROLES)})")
    return _ROLES[raw]


def _split_placeholders(text: str, take_media) -> list[Part]:
    parts: list[Part] = []
    pos = 0
    for m in placeholder_pattern().finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        parts.append(take_media(m.group(1)))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"}


def _record_videos(value: Any) -> list:
    """A record's ``video``: one file, a list of files, or a list of frame images (one video)."""
    items = _as_list(value)
    if items and all(isinstance(i, (str, Path)) and Path(i).suffix.lower() in _IMAGE_SUFFIXES for i in items):
        return [items]
    return items


def record_turns(record: Mapping[str, Any], voice_modality: str = "speech") -> list[Turn]:
    """Turns of a record in the release's data format (``image``, ``video``, ``voice``, ``conversations``),
    with a key per modality of ``unimoe.modalities`` (``speech``, ``audio``, ...). ``voice`` files feed
    ``<audio>`` (or ``<speech>``) placeholders in order and go to ``voice_modality``'s encoder."""
    name = f"record {record.get('id', '?')!r}"
    if not isinstance(record.get("conversations"), list) or not record["conversations"]:
        raise UniMoeInputError(f"{name}: 'conversations' must be a non-empty list")
    queues: dict[str, Iterator] = {
        m.name: iter(
            _record_videos(record.get(m.name)) if m.kind == "video" else _as_list(record.get(m.name))
        )
        for m in MODALITIES.values()
    }
    queues[VOICE_KEY] = iter(_as_list(record.get(VOICE_KEY)))

    def take(modality: str) -> tuple[str, Any]:
        sources = [(modality, queues[modality])]
        if modality in ("speech", "audio"):  # then the release's shared "voice" list
            sources.append((voice_modality if modality == "audio" else "speech", queues["voice"]))
        for target, queue in sources:
            item = next(queue, None)
            if item is not None:
                return target, item
        raise UniMoeInputError(f"{name}: <{modality}> placeholder without a matching media file")

    turns = []
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise UniMoeInputError(f"{name}: conversations[{i}] needs 'from' and a string 'value'")
        role = _role(turn.get("from", ""), name)
        text = turn["value"] if role == "user" else placeholder_pattern().sub("", turn["value"])
        turns.append((role, _split_placeholders(text, take) if role == "user" else [text]))
    leftovers = [k for k, q in queues.items() if next(q, None) is not None]
    if leftovers:
        raise UniMoeInputError(f"{name}: media without a placeholder in the prompt: {leftovers}")
    return turns


def message_turns(messages: Sequence[Mapping[str, Any]]) -> tuple[list[Turn], str | None]:
    """Turns of chat messages (``{"role", "content"}``, content a string or a list of parts such as
    ``{"type": "text", "text": ...}`` and ``{"type": "image", "path": ...}``); also returns the
    system prompt if a system message is present."""
    turns: list[Turn] = []
    system = None
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, Mapping) or "role" not in message:
            raise UniMoeInputError(f"{name}: a message needs 'role' and 'content'")
        content = message.get("content", "")
        if message["role"] == "system":
            system = content if isinstance(content, str) else " ".join(p.get("text", "") for p in content)
            continue
        role = _role(message["role"], name)
        if isinstance(content, str):
            turns.append((role, [content]))
            continue
        parts: list[Part] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                parts.append(part.get("text", ""))
            elif kind in media_names():
                source = next((part[k] for k in (kind, "path", "url") if part.get(k) is not None), None)
                if source is None:
                    raise UniMoeInputError(f"{name}.content[{j}]: {kind} part without '{kind}' or 'path'")
                parts.append((kind, source))
            else:
                raise UniMoeInputError(f"{name}.content[{j}]: unknown content part type {kind!r}")
        turns.append((role, parts))
    return turns, system

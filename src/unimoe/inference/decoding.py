"""Per-row decoding pieces that plug into ``model.generate``: sampling, stopping, detokenising.

``RowSampler`` draws every row's next token with that row's temperature, top-p and seeded random
stream, so that one batch can mix greedy and sampled requests and a seeded request gives the same
text whatever shares its batch. ``RowStops`` ends each row at end-of-sequence, at a stop string or at
its own token limit. ``finish_text`` is the one definition of an answer's text, and
``StreamDetokenizer`` emits deltas that join to exactly that text.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor, StoppingCriteria

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def byte_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the byte-fallback tokens (``<0x41>``...) of a SentencePiece vocabulary."""
    return frozenset(i for t, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids to text, special tokens dropped and leading whitespace stripped."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).lstrip()


def first_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def finish_text(tokenizer, ids: Sequence[int], stops: Sequence[str] = ()) -> tuple[str, bool]:
    """An answer's final text (cut before the first stop string, whitespace stripped) and whether a
    stop string was found."""
    text = decode_answer(tokenizer, ids)
    cut = first_stop(text, stops)
    if cut >= 0:
        text = text[:cut]
    return text.rstrip(), cut >= 0


class RowSampler(LogitsProcessor):
    """Chooses each row's next token and returns scores whose argmax is that token.

    Greedy rows (temperature 0) take the argmax. Sampled rows draw one uniform number per step from
    their own ``torch.Generator`` (seeded with the row's seed, or a random one) and invert the CDF of
    the temperature-scaled, top-p-filtered distribution. Rows with ``ignore_eos`` never pick
    ``eos_token_id``.
    """

    def __init__(self, rows: Sequence, eos_token_id: int | None = None) -> None:
        self.eos_token_id = eos_token_id
        self.no_eos = [bool(getattr(p, "ignore_eos", False)) for p in rows]
        self.temperatures = [float(p.temperature) for p in rows]
        self.top_ps = [float(p.top_p) for p in rows]
        self.generators = [
            torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
            if p.temperature > 0
            else None
            for p in rows
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.eos_token_id is not None and any(self.no_eos):
            banned = torch.tensor(self.no_eos, device=scores.device)
            scores = scores.clone()
            scores[banned, self.eos_token_id] = float("-inf")
        tokens = scores.argmax(dim=-1)  # [B]
        if any(g is not None for g in self.generators):
            tokens = torch.where(self._sampled_mask(scores.device), self._sample(scores), tokens)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens.unsqueeze(1), 0.0)

    def _sampled_mask(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([g is not None for g in self.generators], device=device)

    def _sample(self, scores: torch.Tensor) -> torch.Tensor:
        temps = torch.tensor([t if t > 0 else 1.0 for t in self.temperatures], device=scores.device)
        probs = torch.softmax(scores.float() / temps.unsqueeze(1), dim=-1)  # [B, V]
        if any(p < 1.0 for p in self.top_ps):
            probs = _top_p_filter(probs, torch.tensor(self.top_ps, device=scores.device).unsqueeze(1))
        draws = [torch.rand((), generator=g).item() if g is not None else 0.0 for g in self.generators]
        cdf = probs.cumsum(dim=-1)  # [B, V]
        u = torch.tensor(draws, device=scores.device, dtype=cdf.dtype) * cdf[:, -1]  # [B]
        picked = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
        return picked.clamp(max=scores.shape[-1] - 1)


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zeroes every token outside the smallest set whose mass reaches ``top_p`` (per row)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)  # [B, V]
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


class RowStops(StoppingCriteria):
    """Marks rows finished at end-of-sequence, a stop string or their own token limit; records how
    many tokens each row generated (``lengths``) and why it ended (``reasons``).

    A set ``cancel`` event finishes every row.
    """

    def __init__(
        self,
        tokenizer,
        prompt_len: int,
        limits: Sequence[int],
        stops: Sequence[Sequence[str]],
        cancel: threading.Event | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.limits = list(limits)
        self.stops = [tuple(s) for s in stops]
        self.cancel = cancel
        self.lengths = list(limits)
        self.reasons = ["length"] * len(self.limits)
        self.done = [False] * len(self.limits)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        cancelled = self.cancel is not None and self.cancel.is_set()
        for row in range(len(self.done)):
            if self.done[row]:
                continue
            if last[row] == self.tokenizer.eos_token_id or self._hit_stop(row, input_ids):
                self._finish(row, "stop", generated)
            elif generated >= self.limits[row] or cancelled:
                self._finish(row, "length", generated)
        return torch.tensor(self.done, device=input_ids.device)

    def _hit_stop(self, row: int, input_ids: torch.Tensor) -> bool:
        if not self.stops[row]:
            return False
        text = decode_answer(self.tokenizer, input_ids[row, self.prompt_len :].tolist())
        return first_stop(text, self.stops[row]) >= 0

    def _finish(self, row: int, reason: str, generated: int) -> None:
        self.done[row], self.reasons[row], self.lengths[row] = True, reason, generated


class StreamDetokenizer:
    """Turns a growing list of token ids into text deltas that join to ``finish_text``'s result.

    Text that may still change is held back: trailing whitespace (stripped from a final answer), the
    trailing run of byte-fallback tokens (a run decodes as a whole, and one more byte can turn all of
    it into replacement characters), and a tail that could be the start of a stop string.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), byte_ids: frozenset[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.byte_ids = byte_token_ids(tokenizer) if byte_ids is None else byte_ids
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, new_ids: Sequence[int]) -> str:
        """Adds generated ids; returns the text that is now certain (possibly empty)."""
        self.ids.extend(new_ids)
        end = len(self.ids)
        while end and self.ids[end - 1] in self.byte_ids:
            end -= 1
        text = decode_answer(self.tokenizer, self.ids[:end])
        cut = first_stop(text, self.stops)
        text = text[:cut] if cut >= 0 else text[: len(text) - self._stop_prefix(text)]
        return self._advance(text.rstrip())

    def finish(self, final_text: str) -> str:
        """The rest of the final text."""
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

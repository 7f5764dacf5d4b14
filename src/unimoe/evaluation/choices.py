"""Multiple-choice answers: reading an option letter out of free text, and the scoring rules built on it.

Letter rules (each named, since benchmarks without an official scorer need one):

* ``mmbench``: MMBench's judge-free matching. Punctuation ``.()[],:;!*#{}`` becomes spaces; if exactly
  one option letter (upper case) is a word of the answer, that letter; otherwise, if exactly one
  option's text occurs in the lower-cased answer, that option. Else no answer.
* ``exact``: the answer, stripped of whitespace, must be the letter itself (SEED-Bench's rule).
* ``letter``: ours, for answers in sentences. A lone letter (any case, optionally bracketed and
  followed by ``.``, ``)`` or ``:``); else a letter after "answer", "option" or "choice" ("The answer
  is (B).", "Option c"); else a bracketed upper-case letter; else exactly one upper-case option letter
  standing as a word; else the ``mmbench`` text match.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

LETTER_RULES = ("mmbench", "exact", "letter")
_MMBENCH_PUNCT = ".()[],:;!*#{}"


def _text_match(answer: str, options: Mapping[str, str]) -> str | None:
    lowered = answer.lower()
    found = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def _mmbench(answer: str, options: Mapping[str, str]) -> str | None:
    spaced = answer
    for mark in _MMBENCH_PUNCT:
        spaced = spaced.replace(mark, " ")
    words = spaced.split()
    present = [letter for letter in options if letter in words]
    if len(present) == 1:
        return present[0]
    return _text_match(answer, options)


def _letter(answer: str, options: Mapping[str, str]) -> str | None:
    letters = "".join(options)
    if not letters:
        return None
    lone = re.fullmatch(rf"\s*[(\[]?([{letters}{letters.lower()}])[)\]]?[.:)]?\s*", answer)
    if lone:
        return lone.group(1).upper()
    keyword = re.search(
        rf"\b(?:answer|option|choice)\b\s*(?:is|:)?\s*[(\[]?([{letters}{letters.lower()}])\b", answer, re.I
    )
    if keyword:
        return keyword.group(1).upper()
    bracketed = re.search(rf"[(\[]([{letters}])[)\]]", answer)
    if bracketed:
        return bracketed.group(1)
    words = set(re.findall(rf"\b([{letters}])\b", answer))
    if len(words) == 1:
        return words.pop()
    return _text_match(answer, options)


def extract_letter(answer: str, options: Mapping[str, str], rule: str = "letter") -> str | None:
    """The option letter an answer picks (``options``: letter -> option text), or None."""
    if rule == "mmbench":
        return _mmbench(answer, options)
    if rule == "exact":
        stripped = answer.strip()
        return stripped if stripped in options else None
    if rule == "letter":
        return _letter(answer, options)
    raise ValueError(f"unknown letter rule {rule!r}; choose from {LETTER_RULES}")


def circular_accuracy(groups: Sequence[str], correct: Sequence[bool]) -> float:
    """MMBench's circular evaluation: a question counts only if every rotation of its options (the
    rows sharing its group) is answered correctly."""
    by_group: dict[str, bool] = defaultdict(lambda: True)
    for group, ok in zip(groups, correct, strict=True):
        by_group[group] = by_group[group] and bool(ok)
    return sum(by_group.values()) / len(by_group) if by_group else 0.0

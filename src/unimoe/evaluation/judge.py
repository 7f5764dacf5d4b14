"""Judge-scored benchmarks (MM-Vet, MSVD-QA, ActivityNet-QA) through any OpenAI-compatible endpoint.

The published protocols: MM-Vet asks a judge model for a correctness score in [0, 1] against the
ground truth (``<AND>`` / ``<OR>`` join the parts an answer needs), the benchmark score being its mean
(x100); the video QA benchmarks (Video-ChatGPT's protocol) ask for a yes/no match and a 0-5 score,
reporting the yes-share as accuracy and the mean score. The default instructions here are our
wording of those protocols; ``prompt_file`` replaces them with any text holding ``{question}``,
``{answer}`` and ``{prediction}`` (the published prompt, for example). One judgment per item; the
published MM-Vet number averages several judge runs.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import UniMoeConfigError

MMVET_PROMPT = """You grade answers to questions about an image.
Compare the prediction with the ground truth. In the ground truth, <AND> joins parts that must all be
present and <OR> joins alternatives of which one suffices. Give a correctness score from 0.0 (wrong)
to 1.0 (fully right); partly right answers get a score in between.

Question: {question}
Ground truth: {answer}
Prediction: {prediction}

Reply with the score only, a number between 0.0 and 1.0."""

VIDEO_QA_PROMPT = """You judge answers to questions about a video.
Decide whether the predicted answer means the same as the correct answer (synonyms and paraphrases
count as a match) and rate the match from 0 (no match) to 5 (full match).

Question: {question}
Correct answer: {answer}
Predicted answer: {prediction}

Reply with a JSON object only, such as {{"pred": "yes", "score": 4}}."""

CHOICE_PROMPT = """Which option does the answer below choose?

Question: {question}
Options:
{options}
Answer: {prediction}

Reply with the option's letter only, or Z if the answer chooses none of them."""

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _ask(settings: dict[str, Any], prompt: str) -> str:
    body = {
        "model": settings.get("model") or "judge",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": 64,
    }
    request = urllib.request.Request(
        settings["url"].rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {settings.get('api_key') or 'none'}",
        },
    )
    with urllib.request.urlopen(request, timeout=settings.get("timeout", 120)) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def parse_mmvet(reply: str) -> float | None:
    """The first number of a reply, if it lies in [0, 1]."""
    match = _NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group())
    return value if 0.0 <= value <= 1.0 else None


def parse_video_qa(reply: str) -> tuple[bool, float] | None:
    """``(matched, score)`` from a reply holding ``{"pred": "yes"|"no", "score": n}``."""
    match = re.search(r"\{.*\}", reply, re.S)
    if match is None:
        return None
    try:
        verdict = json.loads(match.group().replace("'", '"'))
        return str(verdict["pred"]).strip().lower().startswith("yes"), float(verdict["score"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def judge_scores(benchmark: str, items: list[dict], predictions: list[str | None], settings: dict) -> dict:
    """Scores of judged benchmark ``benchmark``: ``{"rule", "metrics"}``. A prediction that failed, or
    a judge reply that cannot be read, scores 0 and is counted."""
    if benchmark not in ("mmvet", "msvd-qa", "activitynet-qa"):
        raise UniMoeConfigError(f"{benchmark} is not judge-scored")
    video = benchmark != "mmvet"
    template = VIDEO_QA_PROMPT if video else MMVET_PROMPT
    if settings.get("prompt_file"):
        template = Path(settings["prompt_file"]).read_text(encoding="utf-8")

    def judge(pair) -> Any:
        item, prediction = pair
        if prediction is None:
            return None
        target = item["target"]
        answer = target.get("gt", target.get("answer", ""))
        answer = " <OR> ".join(answer) if isinstance(answer, list) else str(answer)
        prompt = template.format(question=target.get("question", ""), answer=answer, prediction=prediction)
        try:
            reply = _ask(settings, prompt)
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError):
            return None
        return parse_video_qa(reply) if video else parse_mmvet(reply)

    with ThreadPoolExecutor(max_workers=settings.get("concurrency", 8)) as pool:
        verdicts = list(pool.map(judge, zip(items, predictions, strict=True)))
    unread = sum(v is None for v in verdicts)
    rule = f"judge:{settings.get('model') or 'judge'}" + (
        ":custom-prompt" if settings.get("prompt_file") else ""
    )
    n = max(len(verdicts), 1)
    if video:
        matched = [v is not None and v[0] for v in verdicts]
        scores = [v[1] if v is not None else 0.0 for v in verdicts]
        metrics = {"accuracy": 100 * sum(matched) / n, "score": sum(scores) / n}
    else:
        metrics = {"score": 100 * sum(v or 0.0 for v in verdicts) / n}
    metrics["judge_unread"] = unread
    return {"rule": rule, "metrics": metrics}


def judge_letters(
    items: list[dict], predictions: list[str | None], settings: dict, rule: str
) -> list[str | None]:
    """MMBench's judge fallback: answers the letter rule cannot read are given to the judge model,
    which names the option they choose; those answers are replaced by its letter."""
    from .choices import extract_letter

    def resolve(pair) -> str | None:
        item, prediction = pair
        options = item["target"].get("options") or {}
        if prediction is None or extract_letter(prediction, options, rule) is not None:
            return prediction
        listing = "\n".join(f"{k}. {v}" for k, v in options.items())
        prompt = CHOICE_PROMPT.format(
            question=item["target"].get("question", ""), options=listing, prediction=prediction
        )
        try:
            reply = _ask(settings, prompt).strip()
        except (urllib.error.URLError, OSError, KeyError, json.JSONDecodeError):
            return prediction
        letter = reply[:1].upper()
        return letter if letter in options else prediction

    with ThreadPoolExecutor(max_workers=settings.get("concurrency", 8)) as pool:
        return list(pool.map(resolve, zip(items, predictions, strict=True)))

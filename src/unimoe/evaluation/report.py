"""``unimoe eval --report``: scored benchmarks beside the paper's numbers (Table 9 of the journal
version, ``REFERENCE.md``), as a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UniMoeInputError
from .benchmarks import BENCHMARKS

# The paper's accuracy (%) per model variant; two numbers where the paper gives two (RACE-Audio
# middle/high, EHSL long/short).
PAPER = {
    "4e": {
        "A-OKVQA": "70.22", "OK-VQA": "66.02", "VQAv2": "76.4", "MMBench": "73.2", "POPE": "86.0",
        "SEED": "63.4", "MM-Vet": "32.6", "RACE-Audio": "64.21/64.72", "EHSL": "48.00/58.67",
        "ActivityNet-QA": "45.6",
    },
    "8e": {
        "A-OKVQA": "70.7", "OK-VQA": "66.4", "VQAv2": "76.7", "MMBench": "73.2", "POPE": "86.3",
        "SEED": "63.4", "MM-Vet": "32.8", "RACE-Audio": "62.33/64.18", "EHSL": "42.00/50.00",
        "ActivityNet-QA": "46.4",
    },
    "llava-1.5-7b": {
        "A-OKVQA": "70.92", "OK-VQA": "55.09", "VQAv2": "75.9", "MMBench": "72.2", "POPE": "85.9",
        "MM-Vet": "30.5",
    },
    "dense-expert": {"A-OKVQA": "58.86", "VQAv2": "67.35", "RACE-Audio": "30.78/24.90", "EHSL": "9.33/12.00"},
}  # fmt: skip
VARIANT_NAMES = {
    "4e": "Uni-MoE 4E, task 4",
    "8e": "Uni-MoE 8E + aux loss",
    "llava-1.5-7b": "LLaVA-1.5-7B (dense)",
    "dense-expert": "dense expert baseline (I,T,S)",
}


def find_scores(paths: list[Path]) -> list[dict]:
    """Every ``scores.json`` at or under ``paths``."""
    found = []
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.rglob("scores.json"))
        for file in files:
            try:
                found.append(json.loads(file.read_text()))
            except (OSError, json.JSONDecodeError) as err:
                raise UniMoeInputError(f"cannot read {file}: {err}") from err
    if not found:
        raise UniMoeInputError(f"no scores.json under {', '.join(map(str, paths))}")
    return found


def report(paths: list[Path], variant: str = "4e") -> str:
    """The Markdown table of the scores under ``paths`` against the paper's ``variant``."""
    if variant not in PAPER:
        raise UniMoeInputError(f"unknown paper variant {variant!r}; choose from {sorted(PAPER)}")
    lines = [
        f"| benchmark | metric | rule | ours | paper ({VARIANT_NAMES[variant]}) | n | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for scores in sorted(find_scores(paths), key=lambda s: s["benchmark"]):
        spec = BENCHMARKS.get(scores["benchmark"])
        metric = spec.headline if spec else "accuracy"
        metrics = scores["metrics"]
        if metric not in metrics:
            metric = next(iter(metrics))
        value = f"{metrics[metric]:.2f}"
        if not scores.get("official", False):
            value += " (not the official rule)"
        paper = PAPER[variant].get(spec.paper, "-") if spec and spec.paper else "-"
        lines.append(
            f"| {scores['benchmark']} | {metric} | {scores['rule']} | {value} | {paper} | {scores['n']} "
            f"| {scores['errors']} |"
        )
    return "\n".join(lines) + "\n"

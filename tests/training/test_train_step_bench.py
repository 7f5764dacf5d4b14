"""Smoke test of benchmarks/train_step.py: the tiny shape, one round, the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import ROOT

BENCHMARKS = ROOT / "benchmarks"


def test_quick_run_reports_both_methods(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("train_step_bench", BENCHMARKS / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        args = [
            "--quick",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--batch-size",
            "4",
            "--json",
            str(tmp_path / "r.json"),
        ]
        assert module.main(args) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [(r["shape"], r["method"]) for r in rows] == [("tiny", "ours"), ("tiny", "release")]
    for row in rows:
        assert row["step_ms"] > 0 and row["tokens_per_s"] > 0 and row["peak_mb"] > 0
        assert row["release_over_ours"] == rows[1]["step_ms"] / rows[0]["step_ms"]
    assert "release/ours" in capsys.readouterr().out

"""Smoke test of benchmarks/eval.py: the quick run prints the table and writes the JSON summary."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    command = [sys.executable, str(BENCHMARKS / "eval.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "items_per_s" in proc.stdout
    result = json.loads(out.read_text())
    assert [r["method"] for r in result["results"]] == ["release", "unimoe eval"]
    assert all(r["items_per_s"] > 0 for r in result["results"])
    assert set(result["summary"]) == {"tiny_eval_over_release"}

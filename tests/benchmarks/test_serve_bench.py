"""Smoke test of benchmarks/serve.py: a small load on both batching modes, the table and the JSON."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_small_load_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    command = [sys.executable, str(BENCHMARKS / "serve.py"), "--rates", "8", "32", "--requests", "6"]
    command += ["--repeats", "1", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens_per_s" in proc.stdout
    result = json.loads(out.read_text())
    assert {(r["rate"], r["mode"]) for r in result["results"]} == {
        (rate, mode) for rate in (8.0, 32.0) for mode in ("static", "continuous")
    }
    assert all(r["tokens_per_s"] > 0 and r["e2e_p99_ms"] >= r["e2e_p50_ms"] for r in result["results"])
    assert {"knee_rate", "static_p99_doubled", "throughput_ratio", "p99_ratio"} <= set(result["summary"])

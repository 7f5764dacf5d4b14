"""Smoke test of benchmarks/convert_release.py: small layers, the table and the JSON it writes."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "convert.json"
    command = [sys.executable, str(BENCHMARKS / "convert_release.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak/(ckpt+shard)" in proc.stdout
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert row["shape"] == "quick" and row["layers"] == 2 and row["written GiB"] > 0
    assert result["memory"]["peak_bytes"] >= result["memory"]["baseline_bytes"] > 0
    assert set(result["summary"]) == {"peak_over_checkpoint_plus_shard", "peak_over_checkpoint"}

"""Smoke test of the demo-steps benchmark (``train_step.py --demo-steps``): both versions compute the
same first loss, the table, profiles and phase tables print, the JSON holds the summary and phases,
and the timed data loading reads real media."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_quick_run_checks_both_versions_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "demo_steps.json"
    command = [
        sys.executable,
        str(BENCHMARKS / "train_step.py"),
        "--demo-steps",
        "--quick",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--profile",
        "--json",
        str(out),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCHMARKS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage3/after: top operators" in proc.stdout and "Self CPU" in proc.stdout
    result = json.loads(out.read_text())
    assert [(r["step"], r["version"]) for r in result["results"]] == [
        ("stage3", "before"),
        ("stage3", "after"),
        ("clip", "before"),
        ("clip", "after"),
        ("clip", "after, 4 frames"),
    ]
    assert all(
        r["steps_per_s"] > 0 and r["first_loss_relative_difference"] <= 1e-5 for r in result["results"]
    )
    assert set(result["summary"]) == {
        "stage3_speedup",
        "clip_speedup",
        "clip_demo_frames_speedup",
        "two_jobs_side_by_side_speedup",
    }
    assert [r["way"] for r in result["two_jobs"]] == ["one after the other", "side by side, 1 thread each"]
    assert all(r["seconds"] > 0 for r in result["two_jobs"]) and "two jobs:" in proc.stdout
    assert set(result["profiles"]) == {
        "stage3/before",
        "stage3/after",
        "clip/before",
        "clip/after",
        "clip/after, 4 frames",
    }
    assert "where a step's time goes" in proc.stdout
    stage3 = result["phases"]["stage3"]["after"]
    assert {"forward: frozen encoders", "forward: LLM decoder layers", "backward", "optimizer"} <= set(stage3)
    assert "data: collate cached samples (later epochs)" in stage3
    assert "skipping sample" not in proc.stdout + proc.stderr  # the timed data loading found its media
    clip = result["phases"]["clip"]["before"]
    assert {"forward: text tower", "forward: vision tower", "forward: the rest", "backward"} <= set(clip)
    assert all(ms >= 0 for phases in result["phases"].values() for v in phases.values() for ms in v.values())

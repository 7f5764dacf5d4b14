"""``unimoe ablate --quick`` end to end: every variant trains, is scored and lands in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from unimoe.ablation import AblationSettings, run_ablation, suite
from unimoe.cli import main
from unimoe.demo.tasks import ABLATION_TASKS

VERDICTS = {"held", "contradicted", "not shown"}


def _stage1_tasks(out: Path) -> list[str] | None:
    return yaml.safe_load((out / "seed0" / "stage1" / "recipe.yaml").read_text())["data"]["tasks"]


def test_quick_ablation_writes_the_report_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ablation"
    assert main(["ablate", "--quick", "--out-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = ["dense", "generic-moe", "uni-moe", "uni-moe+aux", "uni-moe-8e"]
    assert list(report["variants"]) == names
    assert report["seeds"] == [0] and set(report["tasks"]) == set(ABLATION_TASKS)
    assert {c["verdict"] for c in report["claims"].values()} <= VERDICTS
    samples = {v["train_samples"] for v in report["variants"].values()}
    assert len(samples) == 1  # the same training budget for every variant
    active = {n: v["parameters"]["active_per_token"] for n, v in report["variants"].items()}
    routers = 2 * 64 * 4  # two MoE layers of a hidden-64 router over 4 experts
    assert active["uni-moe"] - active["dense"] == routers == active["generic-moe"] - active["dense"]
    for name, variant in report["variants"].items():
        assert set(variant["accuracy"]) == set(ABLATION_TASKS)
        assert all(0 <= cell["mean"] <= 1 for cell in variant["accuracy"].values())
        if name == "dense":
            assert "routing" not in variant and variant["vs_dense"] is None
            continue
        routing = variant["routing"]
        assert all(0 <= v <= 1 for v in routing["nmi_media"]["per_layer_mean"])
        assert len(routing["experts"]) == (8 if name == "uni-moe-8e" else 4)
        own = routing["own_expert_share"]
        assert (own["image"] is None) == (name == "generic-moe")
        assert variant["vs_dense"]["pairs"] == len(ABLATION_TASKS)
    for figure in ("accuracy.png", "routing.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert all(f"| {task} |" in text for task in ABLATION_TASKS) and "## Claims" in text
    assert "## Claims" in capsys.readouterr().out

    done = out / "seed0" / "uni-moe" / "result.json"
    stamp = done.stat().st_mtime_ns
    assert main(["ablate", "--quick", "--out-dir", str(out), "--variants", "dense,uni-moe"]) == 0
    assert done.stat().st_mtime_ns == stamp  # finished runs are reused, not repeated
    again = json.loads((out / "report.json").read_text())
    assert list(again["variants"]) == ["dense", "uni-moe"]
    assert again["variants"]["uni-moe"]["accuracy"] == report["variants"]["uni-moe"]["accuracy"]

    # own data and a given base model: no stage 0, no text warm-up, stage 1 on all of the data
    own = tmp_path / "own"
    args = ["--data", str(out / "data"), "--base", str(out / "encoders"), "--variants", "dense,uni-moe"]
    assert main(["ablate", "--quick", "--out-dir", str(own), *args]) == 0
    assert not (own / "encoders").exists() and not (own / "seed0" / "text").exists()
    stage1 = json.loads((own / "seed0" / "stage1" / "summary.json").read_text())
    assert stage1["steps"] == 10
    assert _stage1_tasks(own) is None
    assert _stage1_tasks(out) == list(suite.PERCEPTION_COUNTS)  # the suite aligns on perception tasks
    assert list(json.loads((own / "report.json").read_text())["variants"]) == ["dense", "uni-moe"]


def test_own_data_needs_a_base_model_and_both_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--data needs --base"):
        run_ablation(AblationSettings(out_dir=str(tmp_path / "a"), data_dir=str(tmp_path)))
    (tmp_path / "train.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="heldout.json"):
        run_ablation(
            AblationSettings(out_dir=str(tmp_path / "b"), data_dir=str(tmp_path), base=str(tmp_path))
        )

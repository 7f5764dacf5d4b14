"""The report from hand-made per-run results: aggregation, paired comparisons and the claims' verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unimoe.ablation import shipped_variants
from unimoe.ablation.report import build_report, markdown

TASKS = {"t1": 0.5, "t2": 0.25, "t3": 0.5}
INVOCATIONS = [{"wall_seconds": 50.0, "stage0_seconds": 5.0}, {"wall_seconds": 10.0, "stage0_seconds": 0.0}]


def _run(variant: str, seed: int, accuracy: dict[str, float], counts=None, experts=None) -> dict:
    run = {
        "variant": variant,
        "seed": seed,
        "tasks": {
            t: {"accuracy": a, "chance": TASKS[t], "control_accuracy": TASKS[t], "n": 20}
            for t, a in accuracy.items()
        },
        "train": {"samples": 1000, "wall_seconds": 10.0},
        "parameters": {"language_model": 100, "active_per_token": 80},
    }
    if counts is not None:
        run["routing"] = {"layers": [0, 1], "experts": experts, "first_choice_counts": counts}
    return run


def _counts(specialised: bool) -> list:
    """[layers=2, groups=text+4 media, experts=4] first-choice counts."""
    table = np.full((5, 4), 10)
    if specialised:
        table[1:] = np.eye(4, dtype=int) * 40 + 2  # media m mostly at expert m
    return [table.tolist(), table.tolist()]


@pytest.fixture
def report() -> dict:
    results = []
    names = ["image", "video", "speech", "audio"]
    for seed in (0, 1, 2):
        base = {"t1": 0.5 + 0.05 * seed, "t2": 0.4, "t3": 0.6}
        results.append(_run("dense", seed, base))
        results.append(
            _run("generic-moe", seed, {t: a + 0.05 for t, a in base.items()}, _counts(False), ["base"] * 4)
        )
        results.append(_run("uni-moe", seed, {t: a + 0.1 for t, a in base.items()}, _counts(True), names))
    variants = [v for n, v in shipped_variants().items() if n in ("dense", "generic-moe", "uni-moe")]
    return build_report(results, variants, {"bootstrap_samples": 500}, INVOCATIONS)


def test_accuracy_is_aggregated_over_seeds(report: dict) -> None:
    dense = report["variants"]["dense"]
    assert dense["accuracy"]["t1"]["per_seed"] == pytest.approx([0.5, 0.55, 0.6])
    assert dense["accuracy"]["t1"]["mean"] == pytest.approx(0.55)
    assert dense["accuracy"]["t1"]["std"] == pytest.approx(0.05)  # sample standard deviation
    assert dense["mean_accuracy"]["per_seed"][0] == pytest.approx((0.5 + 0.4 + 0.6) / 3)
    assert dense["vs_dense"] is None and "routing" not in dense
    uni = report["variants"]["uni-moe"]
    assert uni["vs_dense"]["mean_difference"] == pytest.approx(0.1)
    assert (uni["vs_dense"]["wins"], uni["vs_dense"]["pairs"]) == (9, 9)
    assert report["tasks"]["t2"] == {"chance": 0.25, "heldout": 20}
    assert (report["wall_seconds"], report["stage0_seconds"]) == (60.0, 5.0)  # summed over runs
    assert report["summary"]["minus_dense"] == {
        "generic-moe": pytest.approx(0.05),
        "uni-moe": pytest.approx(0.1),
    }
    assert report["summary"]["mean_accuracy"]["dense"] == pytest.approx(dense["mean_accuracy"]["mean"])
    assert report["summary"]["claims"] == {"a": "held", "b": "held", "c": "held"}


def test_claims_follow_the_preregistered_criteria(report: dict) -> None:
    claims = report["claims"]
    assert claims["a"]["verdict"] == "held"  # +0.1 on every (task, seed) pair
    assert claims["b"]["verdict"] == "held"  # +0.05 on every pair
    assert claims["c"]["verdict"] == "held"
    routing = report["variants"]["uni-moe"]["routing"]
    assert routing["own_expert_share"]["image"] == pytest.approx(42 / 48)
    assert routing["nmi_media"]["per_layer_mean"][0] > 0.5
    assert report["variants"]["generic-moe"]["routing"]["nmi_media"]["per_layer_mean"] == pytest.approx(
        [0, 0]
    )
    assert report["variants"]["generic-moe"]["routing"]["own_expert_share_mean"] is None
    text = markdown(report)
    assert "| t1 | 0.500 | 0.550 ± 0.050 |" in text and "**(a) held.**" in text


def test_a_claim_without_its_variants_is_not_run(tmp_path: Path) -> None:
    results = [_run("dense", 0, {"t1": 0.5, "t2": 0.5, "t3": 0.5})]
    variants = [shipped_variants()["dense"]]
    report = build_report(results, variants, {"bootstrap_samples": 100}, INVOCATIONS)
    assert {k: c["verdict"] for k, c in report["claims"].items()} == dict.fromkeys("abc", "not run")

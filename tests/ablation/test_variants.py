"""Variant files: the shipped ones load; a broken one is refused with its path and problems named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from unimoe.ablation import load_variant, shipped_variants
from unimoe.training import RecipeError


def test_shipped_variants() -> None:
    variants = shipped_variants()
    assert list(variants) == ["dense", "generic-moe", "uni-moe", "uni-moe+aux", "uni-moe-8e"]
    assert not variants["dense"].is_moe and variants["dense"].init == "widened"
    assert variants["generic-moe"].init == "base" and not variants["generic-moe"].uses_stage2
    assert variants["uni-moe"].aux_loss_coef == 0 < variants["uni-moe+aux"].aux_loss_coef
    assert (variants["uni-moe-8e"].num_experts, variants["uni-moe-8e"].router) == (8, "softmax_topk")
    assert {v.top_k for v in variants.values()} == {2}  # the same active FFN width everywhere
    assert all(v.mixed.is_file() for v in variants.values())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: x\ninit: stage2\nmixed: ../nope.yaml\nrouter: topk_softmax\nnum_experts: 4\n", "not found"),
        ("name: x\ninit: magic\nmixed: m.yaml\n", "init must be one of"),
        ("name: x\ninit: base\nmixed: m.yaml\nrouter: best\nnum_experts: 4\n", "router must be one of"),
        ("name: x\ninit: base\nmixed: m.yaml\nrouter: topk_softmax\nnum_experts: 1\n", "num_experts"),
        ("name: x\ninit: widened\nmixed: m.yaml\nnum_experts: 4\n", "widened (dense) variant has no"),
        ("name: x\ninit: widened\nmixed: m.yaml\ncolour: red\n", "unknown field 'colour'"),
        ("init: widened\n", "missing field 'name'"),
        ("- a list\n", "mapping of fields"),
    ],
)
def test_bad_variant_files_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "m.yaml").write_text("stage: instruct\n")
    path = tmp_path / "v.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=re.escape(problem)) as err:
        load_variant(path)
    assert str(path) in str(err.value)

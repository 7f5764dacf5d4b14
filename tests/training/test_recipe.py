"""Recipes: YAML + dotted overrides -> validated dataclasses; every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_helpers import RECIPES, TINY

from unimoe.training import RecipeError, load_recipe
from unimoe.training.engine import load_deepspeed_config
from unimoe.training.recipe import apply_overrides, parse_overrides

BASE = {"data": {"train": "x.json"}, "train": {"output_dir": "out"}, "model": {"preset": "tiny"}}


def test_overrides_parse_yaml_values_and_dotted_keys() -> None:
    parsed = parse_overrides(
        ["train.max_steps=5", "data.tasks=[a, b]", "train.resume=auto", "model.path=null"]
    )
    assert parsed == [
        (["train", "max_steps"], 5),
        (["data", "tasks"], ["a", "b"]),
        (["train", "resume"], "auto"),
        (["model", "path"], None),
    ]
    merged = apply_overrides({"train": {"epochs": 2}}, ["train.epochs=3", "optim.eps=0.1"])
    assert merged == {"train": {"epochs": 3}, "optim": {"eps": 0.1}}
    recipe = load_recipe(BASE, ["optim.lr=4e-5", "train.batch_size=2"])
    assert recipe.optim.lr == pytest.approx(4e-5) and recipe.train.batch_size == 2
    with pytest.raises(RecipeError, match="key=value"):
        parse_overrides(["train.max_steps"])


def test_unknown_keys_and_bad_types_are_named() -> None:
    with pytest.raises(RecipeError, match=r"train\.max_stepz"):
        load_recipe(BASE, ["train.max_stepz=5"])
    with pytest.raises(RecipeError, match="unified.lora.rnak"):
        load_recipe({**BASE, "stage": "unified"}, ["unified.lora.rnak=4"])
    with pytest.raises(RecipeError, match="train.batch_size: expected int"):
        load_recipe(BASE, ["train.batch_size=four"])
    with pytest.raises(RecipeError, match="stage must be one of"):
        load_recipe({**BASE, "stage": "pretrain"})


def test_inconsistent_recipes_are_refused_with_every_problem_listed() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe({**BASE, "stage": "experts"}, ["train.batch_size=0", "model.path=/m"])
    message = str(err.value)
    assert "non-empty 'experts' list" in message
    assert "train.batch_size must be >= 1" in message
    assert "exactly one of model.preset, model.path" in message
    with pytest.raises(RecipeError, match="only used by stage 'experts'"):
        load_recipe({**BASE, "experts": [{"name": "image", "tasks": ["image_shape"]}]})
    with pytest.raises(RecipeError, match="only apply to stages 'unified' and 'instruct'"):
        load_recipe(BASE, ["unified.experts=full"])
    with pytest.raises(RecipeError, match="repeats with a different definition"):
        experts = [{"name": "a", "tasks": ["x"]}, {"name": "a", "tasks": ["y"]}]
        load_recipe({**BASE, "stage": "experts", "experts": experts})
    with pytest.raises(RecipeError, match="data.train is required"):
        load_recipe({**BASE, "data": {}})
    with pytest.raises(RecipeError, match="needs train.deepspeed_config"):
        load_recipe(BASE, ["train.distributed=deepspeed"])


TRAINING_RECIPES = sorted(
    p for p in RECIPES.rglob("*.yaml") if p.parent.name != "variants"
)  # variants: ablation


@pytest.mark.parametrize("path", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_shipped_recipe_loads(path: Path) -> None:
    overrides = ["data.train=/data/train.json"]
    recipe = load_recipe(path, overrides)
    assert recipe.train.output_dir
    if recipe.train.deepspeed_config:
        config = load_deepspeed_config(recipe.train.deepspeed_config, 4, 4, 8, 1.0, "bf16", 4096)
        assert config["train_batch_size"] == 128 and config["bf16"]["enabled"] is True
        assert config["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    if path.parent.name == "uni-moe-v1" and recipe.stage == "unified":
        release = (recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.warmup_ratio, recipe.train.epochs)
        assert release == (4e-5, 0.0, 0.03, 2)
        assert recipe.train.precision == "bf16" and recipe.train.gradient_checkpointing
        assert recipe.model.max_length == 2048 and recipe.unified.lora.rank == 8


def test_tiny_recipes_stage_settings() -> None:
    names = ["language", "stage1", "stage2", "stage3"]
    stages = [load_recipe(TINY / f"{name}.yaml", ["data.train=x.json"]).stage for name in names]
    assert stages == ["language", "align", "experts", "unified"]

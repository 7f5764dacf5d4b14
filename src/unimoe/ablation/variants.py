"""Ablation variants: each is a small YAML file naming how the MoE starts and which recipe tunes it.

Fields (``recipes/ablation/variants/*.yaml``)::

    name: uni-moe
    init: stage2          # widened (dense, FFNs top_k times wider) | base (copies of the stage-1 FFN)
                          # | stage2 (the stage-2 modality experts, repeated to fill num_experts slots)
    num_experts: 4        # MoE variants only
    router: topk_softmax  # MoE variants only: topk_softmax | softmax_topk
    top_k: 2              # experts per token; the dense variant's FFN width factor
    aux_loss_coef: 0.0    # MoE variants only: the load-balancing loss
    mixed: ../mixed-moe.yaml   # the mixed-data stage's recipe, relative to this file

Every variant trains on the same data for the same number of samples: variants without stage 2 spend
the stage-2 budget in the mixed stage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path

import yaml

from ..training.recipe import RecipeError

VARIANTS_DIR = Path(str(files("unimoe") / "recipes" / "ablation" / "variants"))
INITS = ("widened", "base", "stage2")
ROUTERS = ("topk_softmax", "softmax_topk")


@dataclass(frozen=True)
class VariantSpec:
    """One variant (see the module docstring); ``mixed`` is resolved to an absolute path."""

    name: str
    init: str
    mixed: Path
    top_k: int = 2
    num_experts: int = 0
    router: str | None = None
    aux_loss_coef: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.init != "widened"

    @property
    def uses_stage2(self) -> bool:
        return self.init == "stage2"


def load_variant(path: str | Path) -> VariantSpec:
    """Reads and checks a variant file; raises ``RecipeError`` naming the file and every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RecipeError(f"{path}: cannot read the variant file: {err}") from err
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a variant file is a mapping of fields, got {type(raw).__name__}")
    known = {f.name for f in fields(VariantSpec)}
    problems = [f"unknown field {k!r}" for k in raw if k not in known]
    problems += [f"missing field {k!r}" for k in ("name", "init", "mixed") if k not in raw]
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    spec = VariantSpec(**{**raw, "mixed": (path.parent / raw["mixed"]).resolve()})
    problems = _check(spec)
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    return spec


def _check(spec: VariantSpec) -> list[str]:
    problems = []
    if spec.init not in INITS:
        problems.append(f"init must be one of {INITS}, got {spec.init!r}")
    if spec.top_k < 1:
        problems.append(f"top_k must be >= 1, got {spec.top_k}")
    if not spec.mixed.is_file():
        problems.append(f"mixed recipe {spec.mixed} not found")
    if spec.is_moe:
        if spec.router not in ROUTERS:
            problems.append(f"router must be one of {ROUTERS}, got {spec.router!r}")
        if spec.num_experts < max(spec.top_k, 1) or spec.num_experts < 2:
            problems.append(f"num_experts must be >= 2 and >= top_k, got {spec.num_experts}")
    elif spec.num_experts or spec.router or spec.aux_loss_coef:
        problems.append("a widened (dense) variant has no num_experts, router or aux_loss_coef")
    return problems


def shipped_variants(directory: str | Path = VARIANTS_DIR) -> dict[str, VariantSpec]:
    """The variant files of ``directory`` by name, in the ablation's order (dense first)."""
    specs = [load_variant(p) for p in sorted(Path(directory).glob("*.yaml"))]
    order = {"dense": 0, "generic-moe": 1}
    return {s.name: s for s in sorted(specs, key=lambda s: (order.get(s.name, 2), s.name))}

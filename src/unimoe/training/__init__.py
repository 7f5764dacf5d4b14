"""Training: the three Uni-MoE stages as recipes, one loop, checkpoints, and upcycling between stages.

``train(recipe, overrides)`` runs a recipe (stage ``align``, ``experts`` or ``unified``);
``upcycle(base, experts, out)`` turns the stage-1 model and the stage-2 expert FFNs into the
stage-3 starting point.
"""

from .recipe import Recipe, RecipeError, load_recipe
from .run import train
from .trainer import TrainResult
from .upcycle import upcycle

__all__ = ["Recipe", "RecipeError", "TrainResult", "load_recipe", "train", "upcycle"]

"""The one place the package sets global random state.

Two seeds govern a training run: ``model.seed`` for new weights (a model built from a preset, PEFT
adapters), the same on every process; ``train.seed + rank`` for what differs per step and process
(dropout, router noise). The data order uses a generator of its own (``train.seed + epoch``), never
global state.
"""

from __future__ import annotations

from transformers import set_seed


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    set_seed(seed)

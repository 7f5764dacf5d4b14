"""The ablation: dense vs generic MoE vs Uni-MoE at laptop scale, on a harder synthetic suite.

``run_ablation(AblationSettings())`` (``unimoe ablate``, ``benchmarks/ablation.py``) trains every
variant of ``recipes/ablation/variants/`` over several seeds with the same data and budget, scores
held-out accuracy per task, measures routing specialisation and writes ``report.json``, ``report.md``
and figures. ``suite`` holds what was fixed before the MoE variants ran.
"""

from .runner import AblationSettings, run_ablation
from .variants import VariantSpec, load_variant, shipped_variants

__all__ = ["AblationSettings", "VariantSpec", "load_variant", "run_ablation", "shipped_variants"]

"""The ablation's measures: routing specialisation (NMI, own-expert share) and paired comparisons."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalized_mutual_information(joint: np.ndarray) -> float:
    """NMI between the row and column variables of a count table ``joint [groups, experts]``.

    ``I(G; E) / ((H(G) + H(E)) / 2)`` (arithmetic normalisation), in [0, 1]: 1 when each group's tokens
    go to experts of their own, 0 when the expert is independent of the group. 0 when a variable is
    constant (one group, or every token at one expert) or the table is empty.
    """
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return 0.0
    p = joint / total
    h_g, h_e = _entropy(p.sum(1)), _entropy(p.sum(0))
    if h_g < 1e-12 or h_e < 1e-12:  # a constant variable shares no information
        return 0.0
    mutual = h_g + h_e - _entropy(p.reshape(-1))
    return min(1.0, max(0.0, mutual / ((h_g + h_e) / 2)))


def own_expert_share(
    counts: np.ndarray, groups: Sequence[str], experts: Sequence[str]
) -> dict[str, float | None]:
    """For each group, the share of its tokens whose first choice is an expert named like the group
    (the expert pre-trained on that modality); None for a group without such an expert or tokens.
    ``counts``: ``[groups, experts]`` first-choice counts."""
    out: dict[str, float | None] = {}
    for g, name in enumerate(groups):
        own = [e for e, expert in enumerate(experts) if expert == name]
        total = counts[g].sum()
        out[name] = float(counts[g, own].sum() / total) if own and total > 0 else None
    return out


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: P(a split at least this uneven | wins and losses equally likely)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(
    a: Sequence[float], b: Sequence[float], samples: int = 10000, seed: int = 0
) -> dict[str, float | int | list[float]]:
    """``a - b`` over matched pairs (e.g. the same task and seed): the mean difference, a percentile
    bootstrap 95% interval of it (``samples`` resamples of the pairs), and the sign test over pairs
    (ties left out)."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.size == 0:
        raise ValueError("paired_comparison needs at least one pair")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(samples, diff.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    return {
        "mean_difference": float(diff.mean()),
        "ci95": [float(low), float(high)],
        "pairs": int(diff.size),
        "wins": wins,
        "losses": losses,
        "ties": int(diff.size - wins - losses),
        "sign_test_p": sign_test(wins, losses),
    }


def verdict(comparison: dict) -> str:
    """``held`` when the 95% interval lies above 0, ``contradicted`` when below, else ``not shown``."""
    low, high = comparison["ci95"]
    if low > 0:
        return "held"
    if high < 0:
        return "contradicted"
    return "not shown"

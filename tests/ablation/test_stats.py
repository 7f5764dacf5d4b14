"""The ablation's measures against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unimoe.ablation.stats import (
    normalized_mutual_information,
    own_expert_share,
    paired_comparison,
    sign_test,
    verdict,
)


def test_nmi_is_one_for_a_one_to_one_routing_and_zero_for_an_independent_one() -> None:
    assert normalized_mutual_information(np.diag([5, 3, 7, 2])) == pytest.approx(1.0)
    permuted = np.diag([5, 3, 7, 2])[:, [2, 0, 3, 1]]
    assert normalized_mutual_information(permuted) == pytest.approx(1.0)
    independent = np.outer([1, 2, 3], [4, 1, 2, 5])  # p(g, e) = p(g) p(e)
    assert normalized_mutual_information(independent) == pytest.approx(0.0, abs=1e-12)


def test_nmi_of_a_two_by_two_table_worked_by_hand() -> None:
    # p = [[1/2, 0], [1/4, 1/4]]: H(G) = ln 2, H(E) = H(3/4, 1/4), H(G, E) = H(1/2, 1/4, 1/4)
    h_g = math.log(2)
    h_e = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_ge = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    expected = (h_g + h_e - h_ge) / ((h_g + h_e) / 2)
    assert expected == pytest.approx(0.3437, abs=1e-4)
    assert normalized_mutual_information(np.array([[2, 0], [1, 1]])) == pytest.approx(expected)


def test_nmi_of_degenerate_tables_is_zero() -> None:
    assert normalized_mutual_information(np.zeros((3, 4))) == 0.0
    assert normalized_mutual_information(np.array([[4, 0], [7, 0]])) == 0.0  # one expert takes all
    assert normalized_mutual_information(np.array([[4, 1, 2]])) == 0.0  # one group


def test_own_expert_share_counts_every_slot_of_a_repeated_expert() -> None:
    counts = np.array([[6, 2, 2, 0], [1, 1, 3, 5]])  # groups image, audio; experts below
    shares = own_expert_share(counts, ["image", "audio"], ["image", "video", "image", "audio"])
    assert shares == {"image": pytest.approx(0.8), "audio": pytest.approx(0.5)}
    assert own_expert_share(counts, ["image", "speech"], ["base"] * 4) == {"image": None, "speech": None}
    assert own_expert_share(np.zeros((1, 2)), ["image"], ["image", "video"]) == {"image": None}


def test_sign_test_two_sided_exact_values() -> None:
    assert sign_test(5, 0) == pytest.approx(2 / 32)
    assert sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test(3, 3) == 1.0
    assert sign_test(0, 0) == 1.0


def test_paired_comparison_and_verdicts() -> None:
    better = paired_comparison([0.6, 0.7, 0.8, 0.9], [0.5, 0.6, 0.7, 0.8], samples=500)
    assert better["mean_difference"] == pytest.approx(0.1)
    assert better["ci95"] == pytest.approx([0.1, 0.1])
    assert (better["wins"], better["losses"], better["ties"]) == (4, 0, 0)
    assert verdict(better) == "held"
    worse = paired_comparison([0.5] * 6, [0.7] * 6, samples=500)
    assert verdict(worse) == "contradicted"
    rng = np.random.default_rng(0)
    a = rng.uniform(size=40)
    mixed = paired_comparison(a, a + rng.normal(0, 0.1, size=40), samples=2000)
    low, high = mixed["ci95"]
    assert low <= mixed["mean_difference"] <= high
    assert verdict(mixed) == ("held" if low > 0 else "contradicted" if high < 0 else "not shown")
    with pytest.raises(ValueError, match="at least one pair"):
        paired_comparison([], [])

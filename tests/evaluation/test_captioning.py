"""Captioning metrics through pycocoevalcap, on cases computed by hand.

Two clips whose captions share no word: every n-gram then has document frequency 1 and a positive
weight, so a caption equal to its references has cosine 1 at every n and no length penalty: CIDEr-D
10 (the usual x10 scale); a caption sharing nothing scores 0. The corpus score is their mean.
"""

import pytest

from unimoe.evaluation import captioning
from unimoe.evaluation.captioning import caption_scores

REFERENCES = [
    ["a dog barks loudly at night", "a dog barks loudly at night"],
    ["rain falls on a tin roof", "rain falls on a tin roof"],
]


def test_cider_d_by_hand():
    scores = caption_scores(
        REFERENCES, ["a dog barks loudly at night", "Rain falls on a tin roof."], "cider-d"
    )
    assert scores["cider_d"] == pytest.approx(10.0)
    scores = caption_scores(REFERENCES, ["a dog barks loudly at night", None], "cider-d")
    assert scores["cider_d"] == pytest.approx(5.0)  # a failed prediction is an empty caption
    assert "spice" not in scores


def test_without_java_the_score_is_renamed_and_flagged(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda name: None)
    scores = caption_scores(REFERENCES, ["a dog barks loudly at night", "rain falls on a tin roof"])
    assert scores["cider_d_without_ptb_tokenizer"] == pytest.approx(10.0)
    assert "cider_d" not in scores and "not PTB-tokenised" in scores["warning"]
    assert scores["spice"] == scores["spider"] == "not computed: Java is not installed"


def test_spider_needs_spice():
    scores = caption_scores(REFERENCES, ["a dog barks loudly at night", "rain falls on a tin roof"])
    reason = captioning._spice_missing()
    if reason is None:  # Java and Stanford CoreNLP present: SPIDEr is the mean of CIDEr-D and SPICE
        assert scores["spider"] == pytest.approx((scores["cider_d"] + scores["spice"]) / 2)
    else:
        assert scores["spider"] == f"not computed: {reason}"


def test_clotho_caption_benchmark_scores_release_records(tmp_path):
    import json

    from unimoe.evaluation.runner import EvalSettings, score_only

    records = [
        {
            "id": f"c{i}",
            "voice": ["x.wav"],
            "gt": refs,
            "conversations": [{"from": "human", "value": "<audio>\nDescribe."}],
        }
        for i, refs in enumerate(REFERENCES)
    ]
    (tmp_path / "clotho.json").write_text(json.dumps(records))
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": "c0", "text": "A dog barks loudly at night."}) + "\n")
    scores = score_only(
        EvalSettings("clotho-caption", tmp_path / "clotho.json", rule="cider-d"), tmp_path / "p.jsonl"
    )
    assert scores["metrics"]["cider_d"] == pytest.approx(5.0) and scores["missing"] == 1
    json.dumps(scores)  # plain JSON types

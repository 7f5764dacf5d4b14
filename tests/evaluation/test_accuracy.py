import numpy as np

from unimoe.evaluation.accuracy import evaluate, normalise, score, swap_media
from unimoe.evaluation.routing import plot_losses, plot_routing, routing_counts
from unimoe.presets import build_tiny
from unimoe.processing.conversation import strip_answer


def rec(i, task, answer, image):
    return {
        "id": str(i),
        "task": task,
        "image": image,
        "choices": ["red", "blue"],
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": answer}],
    }


def test_normalise_and_score():
    assert normalise("  Red. It is red") == "red"
    assert normalise("") == ""
    records = [rec(0, "c", "red", "a.png"), rec(1, "c", "blue", "b.png"), rec(2, "c", "red", "c.png")]
    out = score(records, ["red!", "red", "Red circle"])
    assert out == {"c": {"accuracy": 2 / 3, "chance": 0.5, "n": 3}}


def test_swap_media_is_a_derangement_within_task():
    records = [rec(i, "a" if i < 5 else "b", "red", f"{i}.png") for i in range(9)]
    swapped = swap_media(records, seed=3)
    for original, new in zip(records, swapped):
        assert new["image"] != original["image"]
        assert new["conversations"] == original["conversations"]
        src = int(new["image"].split(".")[0])
        assert records[src]["task"] == original["task"]
    assert sorted(r["image"] for r in swapped) == sorted(r["image"] for r in records)


def test_evaluate_uses_control_and_prompt_only():
    records = [rec(i, "c", ["red", "blue"][i % 2], f"{i}.png") for i in range(6)]
    seen = []

    def oracle(prompts):  # answers from the media: file index parity
        seen.append(prompts)
        return [["red", "blue"][int(p["image"].split(".")[0]) % 2] for p in prompts]

    report = evaluate(records, oracle)
    assert report["c"]["accuracy"] == 1.0
    assert report["c"]["control_accuracy"] < 1.0
    assert all(len(p["conversations"]) == 1 for p in seen[0])
    assert strip_answer(records[0])["conversations"] == records[0]["conversations"][:1]


def test_routing_counts_match_token_totals(tmp_path, fixtures_dir):
    model, proc = build_tiny(seed=0)
    records = [
        {"id": "i", "image": str(fixtures_dir / "photo.jpg"),
         "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there"}]},
    ]  # fmt: skip
    batch = proc(records)
    counts = routing_counts(model, [batch])
    k = model.config.text_config.num_experts_per_tok
    real = int(batch["attention_mask"].sum())
    assert counts.shape == (2, 5, 4)
    assert (counts.sum(axis=(1, 2)) == real * k).all()
    assert counts[:, 1].sum(axis=-1).tolist() == [16 * k, 16 * k]  # 16 image tokens per layer
    plot_routing(counts, tmp_path / "r.png", [0, 1], ["a", "b", "c", "d"])
    plot_losses({"s1": [3.0, 2.0], "s2": list(np.linspace(2, 1, 5))}, tmp_path / "l.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and (tmp_path / "l.png").stat().st_size > 1000

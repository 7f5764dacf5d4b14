"""The demo end to end, shortened: every stage runs and the report has the promised structure."""

import json

import torch

from unimoe.demo import DemoSettings, run_demo


def test_short_demo_end_to_end(tmp_path):
    settings = DemoSettings(out_dir=str(tmp_path / "demo"), quick=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two to share: the jobs that do not depend on each other run side by side
    try:
        report = run_demo(settings)
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "demo"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["tasks"] == report["tasks"]
    assert set(on_disk["stages"]) == {"text", "stage1", "stage2", "stage3"}
    for stage in on_disk["stages"].values():
        assert stage["steps"] > 0 and stage["final_loss"] is not None
    assert len(on_disk["tasks"]) == 7
    for row in on_disk["tasks"].values():
        assert set(row) == {"accuracy", "chance", "control_accuracy", "n"}
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 < row["chance"] <= 0.5
    assert (out / "routing.png").stat().st_size > 1000 and (out / "loss.png").stat().st_size > 1000
    assert (out / "stage3" / "final" / "model.safetensors").is_file()
    assert set(on_disk["encoders"]) == {"vision", "speech", "audio"}
    for encoder in on_disk["encoders"].values():
        assert encoder["final_loss"] < encoder["first_loss"]
    # the short run learns the colour tasks, which need the media: better than chance and than the control
    colour = [on_disk["tasks"][t] for t in ("image_color", "video_color")]
    assert sum(r["accuracy"] for r in colour) / 2 > 0.25 + 0.15
    assert sum(r["accuracy"] - r["control_accuracy"] for r in colour) > 0
    # the warm-up ran beside the CLIP pre-training: its result (stage 1's start) has the trained tower
    from safetensors.torch import load_file

    from unimoe.presets import build_tiny

    untrained = build_tiny(seed=settings.seed, moe_layers="none")[0].model.vision_tower.state_dict()
    base, warm = (load_file(out / folder / "model.safetensors") for folder in ("base", "text/final"))
    tower = {f"vision_tower.{k}": v for k, v in untrained.items() if k.endswith("weight")}
    assert tower.keys() <= base.keys() and all(torch.equal(base[k], warm[k]) for k in tower)
    assert any(not torch.equal(base[k], v) for k, v in tower.items())  # trained
    speech = [k for k in base if k.startswith("speech_encoder.")]
    assert speech and all(torch.equal(base[k], warm[k]) for k in speech)
    assert "stage 0: Whisper ASR" in (out / "other-core.log").read_text()  # its progress bars
    # the warm-up's data: every training record with its captions, the cross-modal ones five times
    train = json.loads((out / "data" / "train.json").read_text())
    text = json.loads((out / "captioned.json").read_text())
    per_task = {r["task"]: sum(1 for x in train if x["task"] == r["task"]) for r in train}
    for task, n in per_task.items():
        assert sum(1 for x in text if x["task"] == task) == n * settings.text_repeats.get(task, 1)
    assert settings.text_repeats == {"cross_speech_image": 5}
    assert not any(
        "<image>" in t["value"] or "<speech>" in t["value"] for x in text for t in x["conversations"]
    )


def test_demo_cli_passes_the_heldout_size(monkeypatch):
    import unimoe.demo as demo
    from unimoe.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--quick", "--seed", "3", "--n-heldout", "120", "--out-dir", "x"]) == 0
    assert (seen[0].seed, seen[0].n_heldout, seen[0].quick, seen[0].out_dir) == (3, 120, True, "x")
    assert main(["demo", "--quick"]) == 0
    assert seen[1].n_heldout == DemoSettings(quick=True).n_heldout

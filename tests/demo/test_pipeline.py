"""The demo end to end, shortened: every stage runs and the report has the promised structure."""

import json

from unimoe.demo import DemoSettings, run_demo


def test_short_demo_end_to_end(tmp_path):
    settings = DemoSettings(out_dir=str(tmp_path / "demo"), quick=True)
    report = run_demo(settings)
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

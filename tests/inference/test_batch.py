"""Batch generation over JSONL: both input formats, bad records, resuming an interrupted run."""

import argparse
import json
from pathlib import Path

import pytest

from unimoe.cli_inference import add_inference_commands
from unimoe.inference import GenerationParams, UniMoeEngine
from unimoe.inference.batch import answer_batch, finished_ids, run_batch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PARAMS = GenerationParams(max_new_tokens=6)


def records() -> list[dict]:
    """Release-format records (with and without the reference answer) and chat-message records."""
    out = []
    for i in range(4):
        out.append(
            {
                "id": f"img-{i}",
                "image": "photo.jpg",
                "conversations": [
                    {"from": "human", "value": f"<image>\nQuestion {i}?"},
                    {"from": "gpt", "value": "reference answer"},
                ],
            }
        )
    out.append(
        {
            "id": "voice",
            "voice": "speech.wav",
            "conversations": [{"from": "human", "value": "<audio>\nWhat is said?"}],
        }
    )
    out.append(
        {"id": "broken", "image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>\n?"}]}
    )
    out.append(
        {"id": "chat", "messages": [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"}]}]}
    )
    out.append({"id": "text", "messages": [{"role": "user", "content": "Hello"}]})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_answered_and_bad_one_gets_an_error(engine: UniMoeEngine, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [*records(), "{not json"])
    out = tmp_path / "out.jsonl"
    summary = run_batch(engine, src, out, PARAMS, batch_size=3, media_root=FIXTURES, progress=False)
    lines = {line["id"]: line for line in read_jsonl(out)}
    assert set(lines) == {r["id"] for r in records()} | {"line-9"}
    assert (summary.answered, summary.failed) == (7, 2)
    assert "missing.jpg" in lines["broken"]["error"] and "invalid JSON" in lines["line-9"]["error"]
    for key in ("img-0", "voice", "chat", "text"):
        assert set(lines[key]) == {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"}
    alone = engine.generate([records()[1]], PARAMS, media_root=FIXTURES)[0]
    assert lines["img-1"]["text"] == alone.text  # batched with others, trailing answer dropped


def test_resume_after_interruption(engine: UniMoeEngine, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", records())
    full = tmp_path / "full.jsonl"
    run_batch(engine, src, full, PARAMS, batch_size=4, media_root=FIXTURES, progress=False)
    complete = read_jsonl(full)

    out = tmp_path / "out.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:10])  # killed in the middle of a write
    assert finished_ids(out) == {line["id"] for line in complete[:2]}
    summary = run_batch(engine, src, out, PARAMS, batch_size=4, media_root=FIXTURES, progress=False)
    assert summary.skipped == 2 and summary.answered + summary.failed == len(records()) - 2
    resumed = read_jsonl(out)
    ids = [line["id"] for line in resumed]
    assert len(ids) == len(set(ids)) == len(records())
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(complete, key=lambda r: r["id"])

    again = run_batch(engine, src, out, PARAMS, media_root=FIXTURES, progress=False)
    assert again.skipped == len(records()) and read_jsonl(out) == resumed


def test_failed_batch_is_retried_record_by_record(
    engine: UniMoeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = engine.generate_encoded

    def fail_on_batches(samples, params):
        if len(samples) > 1:
            raise RuntimeError("out of memory")
        return real(samples, params)

    monkeypatch.setattr(engine, "generate_encoded", fail_on_batches)
    lines = answer_batch(engine, records()[:3], PARAMS, FIXTURES)
    assert [line["id"] for line in lines] == ["img-0", "img-1", "img-2"]
    assert all("text" in line for line in lines)


def test_generate_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", records()[-2:])
    out = tmp_path / "answers" / "out.jsonl"
    parser = argparse.ArgumentParser()
    add_inference_commands(parser.add_subparsers(dest="command"))
    argv = ["generate", "--model", "tiny", "--input", str(src), "--output", str(out)]
    args = parser.parse_args([*argv, "--media-root", str(FIXTURES), "--max-new-tokens", "4", "--no-progress"])
    assert args.func(args) == 0
    assert [line["id"] for line in read_jsonl(out)] == ["chat", "text"]
    assert "2 answered, 0 failed" in capsys.readouterr().err

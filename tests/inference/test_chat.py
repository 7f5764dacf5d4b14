"""The terminal chat, driven through its input stream."""

import argparse
import io
import sys
from pathlib import Path

import pytest

from unimoe.cli_inference import add_inference_commands
from unimoe.inference import GenerationParams, UniMoeEngine
from unimoe.inference.chat import chat_loop, split_path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PARAMS = GenerationParams(max_new_tokens=8)


def run(engine: UniMoeEngine, *lines: str):
    out = io.StringIO()
    session = chat_loop(engine, PARAMS, io.StringIO("".join(line + "\n" for line in lines)), out)
    return session, out.getvalue()


def answer(engine: UniMoeEngine, messages: list[dict]) -> str:
    return engine.generate([messages], PARAMS)[0].text


def test_text_turns_keep_history(engine: UniMoeEngine) -> None:
    session, out = run(engine, "Hello", "", "And again?")
    first = answer(engine, [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}])
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == first
    second = answer(engine, session.history[:3])
    assert session.history[3]["content"] == second
    assert out == f"{first}\n{second}\n"


def test_attachments_reset_and_quit(engine: UniMoeEngine) -> None:
    photo, speech = FIXTURES / "photo.jpg", FIXTURES / "speech.wav"
    session, out = run(
        engine,
        f"/image {photo} What is this?",
        "/reset",
        f"/speech {speech}",
        f"/image {photo}",
        "Describe both.",
        "/quit",
        "this line is never read",
    )
    assert "[conversation reset]" in out and "[speech attached" in out and "[image attached" in out
    assert len(session.history) == 2  # the turn before /reset is gone
    content = session.history[0]["content"]
    assert [p["type"] for p in content] == ["speech", "image", "text"]
    assert content[2]["text"] == "Describe both."
    assert session.history[1]["content"] == answer(engine, [session.history[0]])
    assert session.attachments == []


def test_bad_commands_are_reported_and_chat_goes_on(engine: UniMoeEngine) -> None:
    session, out = run(engine, "/image /no/such/file.png", "/teleport", "/video", "Hi")
    assert "file not found" in out and "unknown command /teleport" in out and "usage: /video" in out
    assert [p["type"] for p in session.history[0]["content"]] == ["text"]


def test_media_that_fails_to_load_is_not_kept(engine: UniMoeEngine, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    session, out = run(engine, f"/image {broken} What?", "Hi")
    assert "error: " in out and "cannot decode image" in out
    assert len(session.history) == 2 and session.history[0]["content"][0]["type"] == "text"


def test_split_path_handles_quotes() -> None:
    assert split_path('"my photo.jpg" what is it') == ("my photo.jpg", "what is it")
    assert split_path("photo.jpg   what is it ") == ("photo.jpg", "what is it")
    assert split_path("photo.jpg") == ("photo.jpg", "")


def test_chat_command_reads_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_inference_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["chat", "--model", "tiny", "--max-new-tokens", "4"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))  # ends with end of input
    assert args.func(args) == 0
    assert capsys.readouterr().out.endswith("\n")

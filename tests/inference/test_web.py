"""``unimoe web``: the page's functions against the engine, and the page itself in headless Chromium."""

import json
import threading
from pathlib import Path

import pytest
from web_browser import ask, bot_messages, browser_page, web_server

from unimoe.errors import UniMoeInputError
from unimoe.inference import GenerationParams
from unimoe.inference.continuous import ContinuousBatcher
from unimoe.inference.web import WebChat, chat_messages, user_content

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PHOTO, SPEECH, SOUND = FIXTURES / "photo.jpg", FIXTURES / "speech.wav", FIXTURES / "sound.wav"


@pytest.fixture(scope="module")
def chat(engine):
    scheduler = ContinuousBatcher(engine, max_rows=8)
    scheduler.start()
    yield WebChat(engine, scheduler)
    scheduler.stop()


def test_message_building():
    assert user_content("What?", [str(PHOTO), str(SOUND)], "audio") == [
        {"type": "image", "path": str(PHOTO)},
        {"type": "audio", "path": str(SOUND)},
        {"type": "text", "text": "\nWhat?"},
    ]
    assert user_content("<speech>\nSay it.\n<image>", [str(PHOTO), str(SPEECH)], "speech") == [
        {"type": "speech", "path": str(SPEECH)},
        {"type": "text", "text": "\nSay it.\n"},
        {"type": "image", "path": str(PHOTO)},
    ]
    with pytest.raises(UniMoeInputError, match="notes.txt"):
        user_content("Hi", ["notes.txt"], "speech")
    with pytest.raises(UniMoeInputError, match="<video>"):
        user_content("<video> what?", [str(PHOTO)], "speech")
    history = [
        {"role": "user", "content": {"path": str(PHOTO)}},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A photo."},
    ]
    failed = [
        {"role": "user", "content": {"path": "broken.jpg"}},
        {"role": "assistant", "content": "Error: cannot read"},
    ]
    messages = chat_messages({"text": "And this?", "files": [str(SPEECH)]}, history + failed, "speech")
    assert messages == [
        {
            "role": "user",
            "content": [{"type": "image", "path": str(PHOTO)}, {"type": "text", "text": "\nWhat is it?"}],
        },
        {"role": "assistant", "content": "A photo."},
        {
            "role": "user",
            "content": [{"type": "speech", "path": str(SPEECH)}, {"type": "text", "text": "\nAnd this?"}],
        },
    ]


def test_reply_streams_what_the_engine_answers(engine, chat):
    message = {"text": "What do you see and hear?", "files": [str(PHOTO), str(SOUND)]}
    for voice in ("speech", "audio"):
        chunks = list(chat.reply(message, [], voice, 0.0, 1.0, 12))
        direct = engine.generate([chat_messages(message, [], voice)], GenerationParams(max_new_tokens=12))[0]
        assert chunks[-1] == direct.text and all(direct.text.startswith(c) for c in chunks)
    sampled = GenerationParams(max_new_tokens=12, temperature=0.8, top_p=0.9)
    assert next(iter(chat.reply(message, [], "speech", 0.8, 0.9, 12))) is not None
    assert sampled.temperature == 0.8


def test_concurrent_users_share_batches(engine, chat):
    messages = [{"text": f"Question {i}?", "files": [str(PHOTO)]} for i in range(6)]
    answers = [None] * len(messages)

    def user(i):
        answers[i] = list(chat.reply(messages[i], [], "speech", 0.0, 1.0, 8))[-1]

    before = len(chat.scheduler.batch_sizes)
    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(messages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, message in enumerate(messages):
        alone = engine.generate([chat_messages(message, [], "speech")], GenerationParams(max_new_tokens=8))[0]
        assert answers[i] == alone.text
    assert max(chat.scheduler.batch_sizes[before:]) > 1  # requests shared a batch


def test_bad_upload_is_an_input_error(chat, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a picture")
    with pytest.raises(UniMoeInputError, match="broken.jpg"):
        list(chat.reply({"text": "What?", "files": [str(broken)]}, [], "speech", 0.0, 1.0, 8))


def test_page_in_a_real_browser(engine, tmp_path):
    question = "What is in the picture?"
    content = [{"type": "image", "path": str(PHOTO)}, {"type": "text", "text": "\n" + question}]
    expected = engine.generate(
        [[{"role": "user", "content": content}]], GenerationParams(max_new_tokens=128)
    )[0].text
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a picture")
    from playwright.sync_api import expect

    with web_server("--model", "tiny") as url, browser_page(url) as page:
        ask(page, question, [PHOTO])
        expect(bot_messages(page).last).to_have_text(expected, timeout=60_000)
        page.screenshot(path=str(tmp_path / "exchange.png"), full_page=True)

        ask(page, "And this one?", [broken])
        expect(page.locator(".toast-body").first).to_contain_text("broken.jpg", timeout=60_000)
        expect(bot_messages(page).last).to_contain_text("Error: ", timeout=60_000)
        assert "unimoe-web-" not in bot_messages(page).last.inner_text()  # no temp paths shown

        # the page keeps working; the failed exchange is not context, the first one is
        conversation = [
            {"role": "user", "content": content},
            {"role": "assistant", "content": expected},
            {"role": "user", "content": content},
        ]
        again = engine.generate([conversation], GenerationParams(max_new_tokens=128))[0].text
        ask(page, question, [PHOTO])
        expect(bot_messages(page).last).to_have_text(again, timeout=60_000)
        page.screenshot(path=str(tmp_path / "after_error.png"), full_page=True)
    assert (tmp_path / "exchange.png").stat().st_size > 10_000


def test_examples_from_release_records(tmp_path):
    from unimoe.inference.web import example_messages

    records = [
        {"task": "t1", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nShape?"}]},
        {"task": "t1", "image": "b.jpg", "conversations": [{"from": "human", "value": "<image>\nShape?"}]},
        {"task": "t2", "speech": ["s.wav"], "conversations": [{"from": "human", "value": "<speech>\nWord?"}]},
    ]
    (tmp_path / "heldout.json").write_text(json.dumps(records))
    examples = example_messages(tmp_path / "heldout.json", None, limit=6)
    assert examples == [
        {"text": "<image>\nShape?", "files": [str(tmp_path / "a.jpg")]},
        {"text": "<speech>\nWord?", "files": [str(tmp_path / "s.wav")]},
    ]
    # placeholders place the uploads: the prompt is the record's own
    assert user_content(examples[1]["text"], examples[1]["files"], "speech") == [
        {"type": "speech", "path": str(tmp_path / "s.wav")},
        {"type": "text", "text": "\nWord?"},
    ]

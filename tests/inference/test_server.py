"""The OpenAI-compatible server, live on 127.0.0.1, driven with the official ``openai`` client and httpx."""

import base64
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from unimoe.errors import UniMoeInputError
from unimoe.inference import GenerationParams, Result, UniMoeEngine
from unimoe.inference.scheduler import BatchScheduler
from unimoe.inference.server import ServerConfig, create_app

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """One live server for the module: tiny model, a media root holding photo.jpg and clip.mp4 and a
    symlink to an image outside the root."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from intra-op threads
    base = tmp_path_factory.mktemp("serve")
    root = base / "media"
    root.mkdir()
    for name in ("photo.jpg", "clip.mp4"):
        shutil.copy(FIXTURES / name, root / name)
    shutil.copy(FIXTURES / "photo.jpg", base / "outside.jpg")
    (root / "link.jpg").symlink_to(base / "outside.jpg")

    engine = UniMoeEngine.load("tiny")
    config = ServerConfig(
        media_root=str(root), max_request_bytes=MAX_REQUEST_BYTES, default_max_tokens=16, batch_window_ms=20
    )
    app = create_app(engine, config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "server did not start"
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield SimpleNamespace(url=url, root=root, base=base, engine=engine, service=app.state.service)
    uv.should_exit = True
    thread.join(timeout=10)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server: SimpleNamespace) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def b64(name: str) -> str:
    return base64.b64encode((FIXTURES / name).read_bytes()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def post(server: SimpleNamespace, payload, **kw) -> httpx.Response:
    if isinstance(payload, (bytes, str)):
        kw["content"] = payload
    else:
        kw["json"] = payload
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, **kw)


def assert_healthy(server: SimpleNamespace) -> None:
    response = httpx.get(server.url + "/health", timeout=10)
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_text_request_and_models(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= 8
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_image_speech_and_audio_request_matches_engine(
    client: openai.OpenAI, server: SimpleNamespace
) -> None:
    content = [
        image_part("data:image/jpeg;base64," + b64("photo.jpg")),
        {"type": "input_audio", "input_audio": {"data": b64("speech.wav"), "format": "wav"}},
        {
            "type": "input_audio",
            "input_audio": {"data": b64("sound.wav"), "format": "wav", "modality": "audio"},
        },
        {"type": "text", "text": "What do you see and hear?"},
    ]
    response = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=10, temperature=0
    )
    direct_messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": str(FIXTURES / "photo.jpg")},
                {"type": "speech", "path": str(FIXTURES / "speech.wav")},
                {"type": "audio", "path": str(FIXTURES / "sound.wav")},
                {"type": "text", "text": "What do you see and hear?"},
            ],
        }
    ]
    direct = server.engine.generate([direct_messages], GenerationParams(max_new_tokens=10))[0]
    assert response.choices[0].message.content == direct.text
    assert response.usage.prompt_tokens == direct.prompt_tokens


def test_stream_joins_to_non_streamed_answer(client: openai.OpenAI, server: SimpleNamespace) -> None:
    request = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=24,
        temperature=1.0,
        seed=42,
    )
    answer = client.chat.completions.create(**request)
    chunks = list(
        client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [answer.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**request, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"


def test_32_concurrent_requests_are_batched(client: openai.OpenAI, server: SimpleNamespace) -> None:
    server.service.scheduler.batch_sizes.clear()

    def ask(i: int):
        return client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Question number {i}?"}],
            max_tokens=4 + i % 5,
            temperature=0 if i % 2 else 0.8,
            seed=i,
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(ask, range(32)))
    assert len(answers) == 32
    for i, answer in enumerate(answers):
        assert answer.usage.completion_tokens <= 4 + i % 5
        params = GenerationParams(max_new_tokens=4 + i % 5, temperature=0 if i % 2 else 0.8, seed=i)
        alone = server.engine.generate([[{"role": "user", "content": f"Question number {i}?"}]], params)[0]
        assert answer.choices[0].message.content == alone.text, i  # as if it ran alone
    sizes = server.service.scheduler.batch_sizes  # rows decoded per step (continuous batching)
    assert max(sizes) > 1 and max(sizes) <= 8


def test_64_concurrent_requests_with_media_are_all_answered_right(
    client: openai.OpenAI, server: SimpleNamespace
) -> None:
    """Many threads encode at once (one tokenizer, media decoding in parallel); every answer is the
    one the engine gives that request alone."""
    photo = image_part("data:image/jpeg;base64," + b64("photo.jpg"))

    def content(i: int) -> list:
        return [photo, {"type": "text", "text": f"Describe picture {i} in {i % 7 + 1} words, please."}]

    def ask(i: int) -> str:
        response = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content(i)}], max_tokens=4, temperature=0
        )
        return response.choices[0].message.content

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(ask, range(64)))
    for i, answer in enumerate(answers):
        parts = [{"type": "image", "path": str(FIXTURES / "photo.jpg")}, content(i)[1]]
        alone = server.engine.generate(
            [[{"role": "user", "content": parts}]], GenerationParams(max_new_tokens=4)
        )
        assert answer == alone[0].text, i


def test_processor_pickles_without_its_lock(server: SimpleNamespace) -> None:
    import pickle

    processor = pickle.loads(pickle.dumps(server.engine.processor))
    assert processor._tokens("Hello there") == server.engine.processor._tokens("Hello there")


BAD_REQUESTS = {
    "corrupt base64 image": {
        "messages": [{"role": "user", "content": [image_part("data:image/png;base64,%%not-base64%%")]}]
    },
    "bytes that are no image": {
        "messages": [
            {
                "role": "user",
                "content": [image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())],
            }
        ]
    },
    "unknown part type": {"messages": [{"role": "user", "content": [{"type": "hologram", "hologram": {}}]}]},
    "prompt too long": {"messages": [{"role": "user", "content": "many words " * 800}]},
    "missing messages": {"model": "tiny"},
    "empty messages": {"messages": []},
    "bad temperature": {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    "bad audio modality": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": b64("sound.wav"), "modality": "x"}}
                ],
            }
        ]
    },
    "unsupported role": {"messages": [{"role": "tool", "content": "42"}]},
    "n > 1": {"messages": [{"role": "user", "content": "hi"}], "n": 2},
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_answers_400_and_server_keeps_serving(server: SimpleNamespace, name: str) -> None:
    response = post(server, BAD_REQUESTS[name])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and "code" in error
    assert_healthy(server)


def test_malformed_json_and_oversized_body(server: SimpleNamespace) -> None:
    response = post(server, b'{"messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    huge = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]})
    response = post(server, huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(server.url + "/nowhere").status_code == 404
    assert_healthy(server)


def test_openai_client_sees_bad_request(client: openai.OpenAI, server: SimpleNamespace) -> None:
    with pytest.raises(openai.BadRequestError, match="invalid base64"):
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": [image_part("data:image/png;base64,@@@")]}],
        )
    assert_healthy(server)


def test_local_paths_only_inside_media_root(server: SimpleNamespace) -> None:
    def ask(part: dict) -> httpx.Response:
        return post(
            server,
            {
                "messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]}],
                "max_tokens": 2,
            },
        )

    refused = [
        image_part("../outside.jpg"),
        image_part("link.jpg"),  # a symlink inside the root that points outside
        image_part(str(server.base / "outside.jpg")),
        image_part((server.base / "outside.jpg").as_uri()),
        image_part("https://example.com/cat.png"),  # remote media are off by default
        {"type": "video_url", "video_url": {"url": "../../etc/passwd"}},
    ]
    for part in refused:
        response = ask(part)
        assert response.status_code == 400, part
    assert "outside the media root" in ask(image_part("link.jpg")).json()["error"]["message"]
    assert "remote media" in ask(image_part("https://example.com/cat.png")).json()["error"]["message"]

    allowed = [
        image_part("photo.jpg"),
        image_part((server.root / "photo.jpg").as_uri()),
        {"type": "video_url", "video_url": {"url": "clip.mp4"}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64("clip.mp4")}},
    ]
    for part in allowed:
        response = ask(part)
        assert response.status_code == 200, response.text
    assert_healthy(server)


class FakeEngine:
    """Answers "ok" once ``release`` is set; fails any batch holding the prompt "bad"."""

    name = "fake"
    default_voice_modality = "speech"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = threading.Event()

    def encode(self, messages: list[dict], media_root=None) -> str:
        return messages[-1]["content"]

    def token_limits(self, samples, params) -> list[int]:
        return [p.max_new_tokens for p in params]

    def generate_encoded(self, samples: list[str], params) -> list[Result]:
        self.running.set()
        assert self.release.wait(10)
        if "bad" in samples:
            raise UniMoeInputError("bad prompt")
        return [Result(f"ok {s}", 1, 1, "stop") for s in samples]


def test_full_queue_answers_503_and_slow_answer_504() -> None:
    engine = FakeEngine()
    app = create_app(engine, ServerConfig(max_batch_size=1, max_queue=1, timeout=0.5, batching="static"))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/v1/chat/completions", json=body)
        assert engine.running.wait(10)
        queued = pool.submit(http.post, "/v1/chat/completions", json=body)
        deadline = time.monotonic() + 10
        while app.state.service.scheduler.pending < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        rejected = http.post("/v1/chat/completions", json=body)
        assert rejected.status_code == 503 and rejected.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 504
        assert queued.result().status_code == 504
        engine.release.set()
        answer = http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "ok hi"


def test_failed_batch_is_retried_one_by_one() -> None:
    engine = FakeEngine()
    engine.release.set()
    scheduler = BatchScheduler(engine, max_batch_size=4, window_s=0.2)
    futures = [scheduler.submit(s, GenerationParams(max_new_tokens=1)) for s in ("a", "bad", "c")]
    scheduler.start()
    try:
        assert futures[0].result(10).text == "ok a" and futures[2].result(10).text == "ok c"
        with pytest.raises(UniMoeInputError, match="bad prompt"):
            futures[1].result(10)
        assert scheduler.batch_sizes == [3]
    finally:
        scheduler.stop()


def test_request_shaped_as_lmms_eval_sends_it(
    client: openai.OpenAI, server: SimpleNamespace, tmp_path
) -> None:
    """lmms-eval's OpenAI-compatible model (``unimoe eval``'s README bridge): the image re-encoded as a
    PNG data URL before the text, ``max_tokens`` and ``temperature`` 0, extra body fields, no stop."""
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.open(FIXTURES / "photo.jpg").convert("RGB").save(png)
    content = [
        image_part("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()),
        {
            "type": "text",
            "text": "Is there a cat in the image?\nAnswer the question using a single word or phrase.",
        },
    ]
    response = client.chat.completions.create(
        model="unimoe",
        messages=[{"role": "user", "content": content}],
        max_tokens=12,
        temperature=0,
        extra_body={"media_io_kwargs": {}, "chat_template_kwargs": {}},
    )
    direct = [{"role": "user", "content": [{"type": "image", "path": str(png)}, content[1]]}]
    assert (
        response.choices[0].message.content
        == server.engine.generate([direct], GenerationParams(max_new_tokens=12))[0].text
    )

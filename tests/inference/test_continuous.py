"""Continuous batching: requests arriving while others decode get the answers they get alone."""

import time
from pathlib import Path

import pytest

from unimoe.errors import UniMoeInputError
from unimoe.inference import GenerationParams
from unimoe.inference.continuous import ContinuousBatcher

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def prompt(i: int) -> list[dict]:
    content = [{"type": "text", "text": f"Question {i}: {'tell me more ' * (i % 4)}what now?"}]
    if i % 3 == 0:
        content.insert(0, {"type": "image", "path": str(FIXTURES / "photo.jpg")})
    if i % 3 == 1:
        content.insert(0, {"type": "speech", "path": str(FIXTURES / "speech.wav")})
    return [{"role": "user", "content": content}]


def params(i: int) -> GenerationParams:
    if i % 4 == 3:  # sampled, seeded
        return GenerationParams(max_new_tokens=3 + 2 * i, temperature=0.9, top_p=0.8, seed=100 + i)
    return GenerationParams(max_new_tokens=3 + 2 * i, stop=("ing",) if i % 5 == 2 else ())


def test_staggered_arrivals_equal_each_request_alone(engine):
    samples = [engine.encode(prompt(i)) for i in range(10)]
    alone = [engine.generate_encoded([s], [params(i)])[0] for i, s in enumerate(samples)]
    batcher = ContinuousBatcher(engine, max_rows=4)
    batcher.start()
    try:
        futures = []
        for i, sample in enumerate(samples):
            futures.append(batcher.submit(sample, params(i)))
            time.sleep(0.01 * (i % 3))  # some arrive while others decode
        results = [f.result(60) for f in futures]
    finally:
        batcher.stop()
    for i, (got, want) in enumerate(zip(results, alone, strict=True)):
        assert (got.text, got.token_ids, got.finish_reason) == (
            want.text,
            want.token_ids,
            want.finish_reason,
        ), i
        assert got.prompt_tokens == want.prompt_tokens
    assert max(batcher.batch_sizes) > 1 and max(batcher.batch_sizes) <= 4


def test_short_answers_leave_before_long_ones(engine):
    batcher = ContinuousBatcher(engine, max_rows=8)
    batcher.start()
    finished = {}
    try:
        long = batcher.submit(engine.encode(prompt(0)), GenerationParams(max_new_tokens=60, ignore_eos=True))
        long.add_done_callback(lambda f: finished.setdefault("long", time.monotonic()))
        time.sleep(0.05)
        short = batcher.submit(engine.encode(prompt(1)), GenerationParams(max_new_tokens=2, ignore_eos=True))
        short.add_done_callback(lambda f: finished.setdefault("short", time.monotonic()))
        assert len(short.result(60).token_ids) == 2 and len(long.result(60).token_ids) == 60
    finally:
        batcher.stop()
    assert finished["short"] < finished["long"]  # it joined mid-answer and left first


def test_streams_join_to_the_result(engine):
    batcher = ContinuousBatcher(engine, max_rows=4)
    batcher.start()
    try:
        streams = [batcher.stream(engine.encode(prompt(i)), params(i)) for i in range(4)]
        texts = ["".join(s) for s in streams]
    finally:
        batcher.stop()
    for i, (text, stream) in enumerate(zip(texts, streams, strict=True)):
        assert text == stream.result.text
        assert text == engine.generate([prompt(i)], params(i))[0].text


def test_bad_requests_fail_alone(engine):
    batcher = ContinuousBatcher(engine, max_rows=4)
    batcher.start()
    try:
        with pytest.raises(UniMoeInputError):  # too long: refused before it reaches the batch
            batcher.submit(engine.encode([{"role": "user", "content": "word " * 600}]), GenerationParams())
        good = batcher.submit(engine.encode(prompt(2)), params(2))
        assert good.result(60).text == engine.generate([prompt(2)], params(2))[0].text
    finally:
        batcher.stop()


def test_a_closed_stream_leaves_the_batch(engine):
    batcher = ContinuousBatcher(engine, max_rows=4)
    batcher.start()
    try:
        stream = batcher.stream(
            engine.encode(prompt(5)), GenerationParams(max_new_tokens=400, ignore_eos=True)
        )
        next(stream)  # the answer has started
        stream.close()  # the reader leaves: its row stops long before 400 tokens
        other = batcher.submit(engine.encode(prompt(6)), GenerationParams(max_new_tokens=3, ignore_eos=True))
        assert len(other.result(60).token_ids) == 3
        deadline = time.monotonic() + 30
        while batcher.batch_sizes and batcher._rows and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not batcher._rows and len(batcher.batch_sizes) < 100
    finally:
        batcher.stop()


def test_token_budget_holds_requests_back_until_there_is_room(engine):
    samples = [engine.encode(prompt(i)) for i in range(6)]
    rows = [GenerationParams(max_new_tokens=8 + i) for i in range(6)]
    alone = [engine.generate_encoded([s], [p])[0].text for s, p in zip(samples, rows, strict=True)]
    budget = max(len(s.input_ids) for s in samples) + 20  # room for about one request at a time
    batcher = ContinuousBatcher(engine, max_rows=4, max_tokens=budget)
    batcher.start()
    try:
        futures = [batcher.submit(s, p) for s, p in zip(samples, rows, strict=True)]
        assert [f.result(60).text for f in futures] == alone
    finally:
        batcher.stop()
    assert max(batcher.batch_sizes) < 4  # the budget, not the row limit, bounded the batch

"""UniMoeEngine: batching, streaming, stop strings, seeded sampling, limits, loading."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from unimoe.errors import UniMoeInputError
from unimoe.inference import GenerationParams, UniMoeEngine
from unimoe.inference.decoding import StreamDetokenizer, finish_text

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and they stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(one_thread: None) -> UniMoeEngine:
    return UniMoeEngine.load("tiny")


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return [{"role": "user", "content": content}]


def media(kind: str, name: str) -> dict:
    return {"type": kind, "path": str(FIXTURES / name)}


CONVERSATIONS = [
    user("Hi there"),
    user(media("image", "photo.jpg"), media("speech", "speech.wav"), "What is shown and said?"),
    user(media("audio", "sound.wav"), "Describe the sound in a few words, please."),
    user(media("video", "clip.mp4"), "What happens?"),
]


def test_batched_greedy_equals_each_conversation_alone(engine: UniMoeEngine) -> None:
    params = GenerationParams(max_new_tokens=12)
    batched = engine.generate(CONVERSATIONS, params)
    prompt_lengths = {r.prompt_tokens for r in batched}
    assert len(prompt_lengths) > 1  # the batch really is left-padded
    for conversation, together in zip(CONVERSATIONS, batched):
        alone = engine.generate([conversation], params)[0]
        assert together.token_ids == alone.token_ids
        assert together.text == alone.text
        assert together.prompt_tokens == alone.prompt_tokens


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_stream_deltas_join_to_generated_text(engine: UniMoeEngine, temperature: float) -> None:
    for seed in range(4):
        params = GenerationParams(max_new_tokens=24, temperature=temperature, seed=seed)
        expected = engine.generate([CONVERSATIONS[2]], params)[0]
        stream = engine.stream(CONVERSATIONS[2], params)
        deltas = list(stream)
        assert "".join(deltas) == expected.text
        assert stream.result == expected


def test_stream_with_stop_string_joins_to_cut_text(engine: UniMoeEngine) -> None:
    full = engine.generate([CONVERSATIONS[0]], GenerationParams(max_new_tokens=24, temperature=1.0, seed=7))[
        0
    ]
    stop = full.text[len(full.text) // 2 :][:2]
    params = GenerationParams(max_new_tokens=24, temperature=1.0, seed=7, stop=(stop,))
    cut = engine.generate([CONVERSATIONS[0]], params)[0]
    assert "".join(engine.stream(CONVERSATIONS[0], params)) == cut.text


def test_stop_string_cuts_output_at_first_occurrence(engine: UniMoeEngine) -> None:
    full = engine.generate([CONVERSATIONS[1]], GenerationParams(max_new_tokens=24))[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.generate([CONVERSATIONS[1]], GenerationParams(max_new_tokens=24, stop=(stop, "never-seen")))[
        0
    ]
    assert cut.text == full.text[: full.text.index(stop)].rstrip()
    assert cut.finish_reason == "stop"
    assert cut.completion_tokens < full.completion_tokens  # generation ended early, not just the text


def test_seeded_sampling_is_reproducible(engine: UniMoeEngine) -> None:
    params = GenerationParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=123)
    first = engine.generate([CONVERSATIONS[0]], params)[0]
    assert engine.generate([CONVERSATIONS[0]], params)[0].text == first.text
    in_batch = engine.generate(CONVERSATIONS[:3], [GenerationParams(max_new_tokens=4), params, params])
    assert engine.generate([CONVERSATIONS[1]], params)[0].text == in_batch[1].text
    others = {
        engine.generate([CONVERSATIONS[0]], GenerationParams(max_new_tokens=16, temperature=1.0, seed=s))[
            0
        ].text
        for s in range(4)
    }
    assert len(others) > 1


def test_tiny_top_p_is_greedy(engine: UniMoeEngine) -> None:
    greedy = engine.generate([CONVERSATIONS[0]], GenerationParams(max_new_tokens=12))[0]
    nucleus = engine.generate(
        [CONVERSATIONS[0]], GenerationParams(max_new_tokens=12, temperature=2.0, top_p=1e-6, seed=1)
    )[0]
    assert nucleus.token_ids == greedy.token_ids


def test_limits_counts_and_finish_reasons(engine: UniMoeEngine) -> None:
    results = engine.generate(
        CONVERSATIONS[:2], [GenerationParams(max_new_tokens=3), GenerationParams(max_new_tokens=9)]
    )
    for result, limit in zip(results, (3, 9)):
        assert result.completion_tokens == len(result.token_ids) <= limit
        eos = engine.processor.tokenizer.eos_token_id
        assert result.finish_reason == ("stop" if eos in result.token_ids else "length")
        if result.finish_reason == "length":
            assert result.completion_tokens == limit
    room = engine.max_positions - results[0].prompt_tokens
    assert engine.token_limits([engine.encode(CONVERSATIONS[0])], [GenerationParams(10**6)]) == [room]


def test_bad_input_raises_input_error(engine: UniMoeEngine) -> None:
    with pytest.raises(UniMoeInputError, match="exceed the limit"):
        engine.generate([user("word " * 2000)])
    with pytest.raises(UniMoeInputError, match="not found"):
        engine.generate([user(media("image", "missing.png"), "?")])
    with pytest.raises(UniMoeInputError, match="max_new_tokens"):
        GenerationParams(max_new_tokens=0)


def test_record_and_trailing_answer_are_ignored(engine: UniMoeEngine) -> None:
    record = {
        "id": "r1",
        "image": "photo.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A reference answer that must not reach the prompt."},
        ],
    }
    messages = user(media("image", "photo.jpg"), "What is this?")
    messages[0]["content"][1]["text"] = "\nWhat is this?"
    params = GenerationParams(max_new_tokens=8)
    from_record = engine.generate([record], params, media_root=FIXTURES)[0]
    assert from_record.token_ids == engine.generate([messages], params)[0].token_ids


def test_detokenizer_holds_back_byte_runs(engine: UniMoeEngine) -> None:
    tok = engine.processor.tokenizer
    ids = tok.convert_tokens_to_ids(
        ["▁w", "hat", "<0x2A>", "<0x41>", "<0x9B>", "▁is", "<0xE4>", "<0xB8>", "<0xAD>"]
    )
    detok = StreamDetokenizer(tok)
    deltas = [detok.push([i]) for i in ids]
    final, _ = finish_text(tok, ids)
    deltas.append(detok.finish(final))
    assert "".join(deltas) == final == tok.decode(ids, skip_special_tokens=True).strip()
    assert final.startswith("what") and final.endswith("中")
    assert deltas[2:5] == ["", "", ""]  # the run <0x2A><0x41><0x9B> is held back until it ends


def test_load_model_directory(engine: UniMoeEngine, tmp_path: Path) -> None:
    engine.model.save_pretrained(tmp_path)
    engine.processor.save_pretrained(tmp_path)
    loaded = UniMoeEngine.load(str(tmp_path), device="cpu", dtype="float32")
    params = GenerationParams(max_new_tokens=8)
    assert loaded.generate(CONVERSATIONS[:2], params) == engine.generate(CONVERSATIONS[:2], params)
    with pytest.raises(FileNotFoundError):
        UniMoeEngine.load(str(tmp_path / "nope"))

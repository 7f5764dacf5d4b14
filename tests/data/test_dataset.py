"""The training data pipeline: record loading, lazy encoding with bad-sample skipping, the grouped
sampler's determinism and sharding, and ``data check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unimoe.cli_training import main as cli_main
from unimoe.data.check import check_data
from unimoe.data.dataset import (
    Collator,
    MalformedRecord,
    SkippedSample,
    SupervisedDataset,
    clear_encoded_cache,
    load_records,
    record_modalities,
)
from unimoe.data.sampler import GroupedBatchSampler
from unimoe.demo.synth import synthesize
from unimoe.presets import build_tiny
from unimoe.processing.processor import IGNORE_INDEX, EncodedSample


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth_data")
    synthesize(
        out, seed=3, n_train=2, n_heldout=0, tasks=["image_shape", "speech_word", "cross_speech_image"]
    )
    return out


@pytest.fixture(scope="module")
def processor():
    return build_tiny(0)[1]


def _plant_problems(data_dir: Path, target: Path) -> list[dict]:
    """Copies the records with a corrupt image, a missing wav, a cut-short wav, a placeholder mismatch and
    malformed entries."""
    records = json.loads((data_dir / "train.json").read_text())
    (target / "broken.png").write_bytes(b"\x89PNG not really")
    records[0] = {**records[0], "image": str(target / "broken.png")}
    records[2] = {**records[2], "speech": ["media/speech/does-not-exist.wav"]}
    wav = (data_dir / records[3]["speech"][0]).read_bytes()
    (target / "cut.wav").write_bytes(wav[: len(wav) // 2])  # a WAV cut short: its header says more
    records[3] = {**records[3], "speech": [str(target / "cut.wav")]}
    mismatch = {**records[1], "id": "mismatch"}
    mismatch["conversations"] = [
        {"from": "human", "value": "<image>\n<image>\nTwo?"},
        {"from": "gpt", "value": "no"},
    ]
    records += [mismatch, {"id": "no-conversations"}, "not a record"]
    return records


def test_json_and_jsonl_records(data_dir: Path, tmp_path: Path) -> None:
    records = load_records(data_dir / "train.json")
    assert len(records) == 6 and all(isinstance(r, dict) for r in records)
    lines = [json.dumps(r) for r in records[:2]] + ["{not json", "[1, 2]"]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
    loaded = load_records(tmp_path / "data.jsonl")
    assert loaded[:2] == records[:2]
    assert isinstance(loaded[2], MalformedRecord) and "invalid JSON" in loaded[2].reason
    assert isinstance(loaded[3], MalformedRecord) and "not a mapping" in loaded[3].reason
    assert record_modalities(records[-1]) == ["image", "speech"]
    assert record_modalities({"voice": ["a.wav"]}, voice_modality="audio") == ["audio"]


def test_bad_samples_are_skipped_and_counted(data_dir: Path, tmp_path: Path, processor) -> None:
    records = _plant_problems(data_dir, tmp_path)
    dataset = SupervisedDataset(load_records_from(records, tmp_path), processor, data_dir)
    items = [dataset[i] for i in range(len(dataset))]
    skipped = [i for i in items if isinstance(i, SkippedSample)]
    assert [s.record_id for s in skipped] == [
        "train-image_shape-00000",
        "train-speech_word-00000",
        "train-speech_word-00001",
        "mismatch",
        "no-conversations",
        "data.json[8]",
    ]
    assert "cannot decode image" in skipped[0].reason and "not found" in skipped[1].reason
    assert "cut.wav is cut short" in skipped[2].reason
    batch = Collator(processor)(items[:4])
    assert batch.num_samples == 1 and len(batch.skipped) == 3 and not batch.filler
    assert batch.inputs["input_ids"].shape[0] == 1
    filler = Collator(processor)([items[0], items[-1]])
    assert filler.filler and filler.num_samples == 0 and filler.target_tokens == 0
    assert (filler.inputs["labels"] == IGNORE_INDEX).all()


def load_records_from(records: list, folder: Path) -> list:
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return load_records(path)


def test_dataset_encodes_lazily_with_the_processor(data_dir: Path, processor) -> None:
    dataset = SupervisedDataset.from_file(data_dir / "train.json", processor, tasks=["cross_speech_image"])
    assert len(dataset) == 2 and dataset.modality_groups() == ["image+speech"] * 2
    sample = dataset[0]
    assert isinstance(sample, EncodedSample)
    assert len(sample.media["image"]) == 1 and len(sample.media["speech"]) == 1
    assert dataset.lengths()[0] > processor.settings.image_tokens


def _sampler(world: int, rank: int, epoch: int = 0, **kw) -> list[list[int]]:
    groups = ["image"] * 10 + ["speech"] * 7 + ["image+speech"] * 5
    lengths = [(i * 37) % 50 for i in range(len(groups))]
    sampler = GroupedBatchSampler(
        groups, lengths, batch_size=4 // world, num_replicas=world, rank=rank, seed=1, **kw
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def test_sampler_groups_shuffles_and_is_deterministic() -> None:
    groups = ["image"] * 10 + ["speech"] * 7 + ["image+speech"] * 5
    first, again, other = _sampler(1, 0), _sampler(1, 0), _sampler(1, 0, epoch=1)
    assert first == again and first != other
    seen = [i for b in first for i in b]
    assert sorted(set(seen)) == list(range(22)) and len(seen) == 24  # the short last batch wraps around
    pure = [b for b in first if len({groups[i] for i in b}) == 1]
    assert len(pure) >= 4  # only the remainders of the three groups mix
    unshuffled = _sampler(1, 0, shuffle=False)
    assert unshuffled[0] == [0, 1, 2, 3]


def test_sampler_shards_the_same_global_batches() -> None:
    whole = _sampler(1, 0)
    shards = [_sampler(2, r) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for batch, a, b in zip(whole, *shards):
        padded = [batch[i % len(batch)] for i in range(4)]
        assert a + b == padded
    skipped = GroupedBatchSampler(["x"] * 8, [1] * 8, 2, seed=0)
    skipped.set_epoch(0, start=2)
    full = GroupedBatchSampler(["x"] * 8, [1] * 8, 2, seed=0)
    full.set_epoch(0)
    assert list(skipped) == list(full)[2:]


def test_data_check_reports_every_planted_problem(data_dir: Path, tmp_path: Path, processor, capsys) -> None:
    records = _plant_problems(data_dir, tmp_path)
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(records))
    report = check_data(path, data_dir, processor=processor)
    assert report.records == 9 and report.bad_records == 6 and not report.ok
    assert report.counts == {
        "malformed": 2,
        "placeholder_mismatch": 1,
        "missing_media": 1,
        "unreadable_media": 2,
        "too_long": 0,
    }
    assert report.examples["missing_media"][0].startswith("train-speech_word-00000: speech file not found")
    assert cli_main(["data", "check", str(path), "--media-root", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert "9 records, 6 with problems" in out and "unreadable_media: 2" in out
    assert cli_main(["data", "check", str(data_dir / "train.json")]) == 0
    limit = processor.settings.max_length
    processor.settings.max_length = 40
    try:
        too_long = check_data(data_dir / "train.json", processor=processor)
    finally:
        processor.settings.max_length = limit
    assert too_long.counts["too_long"] == 6


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_cache_encodes_each_record_once(processor, fixtures_dir):
    tiny_processor = processor
    records = [
        {"id": "a", "image": str(fixtures_dir / "photo.jpg"), "conversations": _turns("<image>\nQ?", "yes")},
        {"id": "b", "image": str(fixtures_dir / "missing.jpg"), "conversations": _turns("<image>\nQ?", "no")},
    ]
    calls = []
    original = tiny_processor.encode_record

    def counting(record, media_root=None, **kw):
        calls.append(record["id"])
        return original(record, media_root, **kw)

    tiny_processor.encode_record = counting
    clear_encoded_cache()
    try:
        cached = SupervisedDataset(records, tiny_processor, cache=True)
        first = [cached[0], cached[1], cached[0], cached[1]]
        plain = SupervisedDataset(records, tiny_processor)
        plain[0], plain[0]
        # a later caching data set of the same records and processor (the next stage) encodes nothing
        again = SupervisedDataset(records[::-1], tiny_processor, cache=True)
        assert again[1] is first[0]
        # another processor setting: encoded anew
        limit = tiny_processor.settings.max_length
        tiny_processor.settings.max_length = limit + 1
        other = SupervisedDataset(records, tiny_processor, cache=True)
        assert other[0] is not first[0]
        tiny_processor.settings.max_length = limit
    finally:
        del tiny_processor.encode_record
        clear_encoded_cache()
    assert calls == ["a", "b", "a", "a", "a"]
    assert first[0] is first[2] and isinstance(first[1], SkippedSample) and first[1] is first[3]

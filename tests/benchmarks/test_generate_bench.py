"""Smoke test of benchmarks/generate.py: the quick run, the JSON it writes, the agreement check."""

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def generate_bench(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The script loaded as a module, with its folder importable as it is when run directly."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("generate_bench", BENCHMARKS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_quick_run_writes_json(
    generate_bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "generate.json"
    assert generate_bench.main(["--quick", "--threads", "1", "--json", str(path)]) == 0

    payload = json.loads(path.read_text())
    assert payload["device"] == "cpu" and payload["threads"] == 1
    results = payload["results"]
    assert [(r["method"], r["batch"]) for r in results] == [
        ("release", 1),
        ("engine b1", 1),
        ("engine b4", 4),
    ]
    for r in results:
        assert set(r) == set(generate_bench.RESULT_KEYS)
        assert r["shape"] == "tiny" and r["new_tokens"] == 8
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0
    assert results[0]["speedup"] == 1.0
    assert "engine b4" in capsys.readouterr().out


def test_release_way_matches_engine_and_check_catches_a_difference(
    generate_bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    engine = generate_bench.build_engine(generate_bench.tiny(), torch.device("cpu"), torch.float32)
    samples = [engine.encode(p) for p in generate_bench.prompts(2)]
    generate_bench.check_methods_agree(engine, samples, 4)

    monkeypatch.setattr(generate_bench, "release_generate", lambda *args: [-1] * 4)
    with pytest.raises(AssertionError, match="differ"):
        generate_bench.check_methods_agree(engine, samples, 4)

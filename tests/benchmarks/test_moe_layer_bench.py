"""Smoke test of benchmarks/moe_layer.py: tiny shapes, one round, the JSON it writes."""

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
RESULT_KEYS = {"impl", "experts", "tokens", "hidden", "ffn", "top_k", "fwd_ms", "fwd_bwd_ms"}


@pytest.fixture
def moe_layer(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The script loaded as a module, with its folder importable as it is when run directly."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("moe_layer_bench", BENCHMARKS / "moe_layer.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)


def test_quick_run_writes_json(moe_layer: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "moe.json"
    # one thread: on a busy machine two-thread parallel regions wait for each other and stretch tiny ops
    argv = ["--quick", "--repeats", "1", "--threads", "1", "--no-memory", "--json", str(path)]
    assert moe_layer.main(argv) == 0

    payload = json.loads(path.read_text())
    assert payload["device"] == "cpu"
    assert payload["dtype"] == "float32"
    assert payload["threads"] == 1
    assert payload["torch"] == torch.__version__
    results = payload["results"]
    assert [(r["impl"], r["experts"]) for r in results] == [
        (impl, e) for e in (4, 8) for impl in moe_layer.IMPLS
    ]
    for r in results:
        assert set(r) == RESULT_KEYS
        assert (r["tokens"], r["hidden"], r["ffn"], r["top_k"]) == (64, 64, 128, 2)
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
    for e in (4, 8):
        assert sum(payload["expert_tokens"][str(e)]) == 64 * 2
        samples = payload["samples_ms"][str(e)]
        assert set(samples) == {f"{impl}/{mode}" for impl in moe_layer.IMPLS for mode in ("fwd", "fwd_bwd")}
        assert all(len(times) == 1 for times in samples.values())

    for e in (4, 8):
        summary = payload["summary"][f"E={e}"]
        assert summary["unimoe_fwd_bwd_over_dense"] > 0
        assert {f"{peer}_over_unimoe_fwd_bwd" for peer in moe_layer.SPARSE_IMPLS[1:]} <= set(summary)

    table = capsys.readouterr().out
    for impl in moe_layer.IMPLS:
        assert impl in table


def test_peak_memory_of_one_implementation_in_a_fresh_process(moe_layer: ModuleType) -> None:
    args = moe_layer.parse_args(["--quick", "--threads", "1"])
    peaks = moe_layer.peak_in_child("unimoe", 4, args)
    assert set(peaks) == {"fwd_peak_mb", "fwd_bwd_peak_mb"}
    # the training step holds at least its weight gradients: 3 * E * H * D fp32 values
    assert peaks["fwd_bwd_peak_mb"] >= 3 * 4 * args.ffn * args.hidden * 4 / 2**20


def test_equivalence_check_catches_a_wrong_implementation(moe_layer: ModuleType) -> None:
    args = moe_layer.parse_args(["--quick"])
    weights = moe_layer.ExpertWeights.random(4, args.hidden, args.ffn, seed=0)
    modules = moe_layer.build_all(weights, 2, args)
    x, grad_out = torch.randn(2, 1, 32, args.hidden, generator=torch.Generator().manual_seed(0))
    moe_layer.check_equivalence(modules, x, grad_out)

    with torch.no_grad():
        modules["capacity_einsum"].down_proj[1].mul_(1.01)
    with pytest.raises(AssertionError, match="capacity_einsum differs from unimoe in its output"):
        moe_layer.check_equivalence(modules, x, grad_out)

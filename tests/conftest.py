from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from unimoe.inference import UniMoeEngine

torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="module")
def engine() -> Iterator[UniMoeEngine]:
    """The tiny random engine, on one intra-op thread (the tiny model gains nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield UniMoeEngine.load("tiny")
    torch.set_num_threads(threads)

from collections.abc import Iterator

import pytest
import torch

from unimoe.inference import UniMoeEngine


@pytest.fixture(scope="module")
def engine() -> Iterator[UniMoeEngine]:
    """The tiny random engine, on one intra-op thread (the tiny model gains nothing from more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield UniMoeEngine.load("tiny")
    torch.set_num_threads(threads)

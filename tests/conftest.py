from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES

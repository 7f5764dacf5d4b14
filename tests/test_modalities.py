"""A modality added to the table alone reaches the processor, the model, the data code and evaluation.

The test adds ``depth``: depth maps read as images through CLIP and the image projector (a second
modality of an existing kind, as video is), with its own placeholder, record key and model input.
"""

import pytest
import torch

from unimoe import UniMoeForConditionalGeneration
from unimoe.data.dataset import record_modalities
from unimoe.evaluation.accuracy import swap_media
from unimoe.modalities import MODALITIES, Modality, media_input_keys, token_groups
from unimoe.presets import tiny
from unimoe.processing.processor import UniMoeProcessor

DEPTH = Modality("depth", "image", "pixel_values_depth", "vision_tower", "image_projector", "vision_config")


@pytest.fixture
def with_depth(monkeypatch):
    monkeypatch.setitem(MODALITIES, "depth", DEPTH)
    config = tiny()
    config.depth_token_id = config.audio_token_id + 1  # the tokenizer's next added token
    return config


def depth_record(fixtures_dir, rid="d0"):
    return {
        "id": rid,
        "task": "depth_shape",
        "depth": str(fixtures_dir / "photo.jpg"),
        "conversations": [
            {"from": "human", "value": "<depth>\nHow far is it?"},
            {"from": "gpt", "value": "near"},
        ],
    }


def test_the_table_lists_the_new_modality(with_depth):
    assert token_groups()[-1] == "depth" and "pixel_values_depth" in media_input_keys()
    assert "depth" in with_depth.modalities and with_depth.placeholder_ids()["depth"] == 516


def test_processor_and_model_read_the_new_modality(with_depth, fixtures_dir):
    processor = UniMoeProcessor.for_config(with_depth)
    torch.manual_seed(0)
    model = UniMoeForConditionalGeneration(with_depth)
    batch = processor([depth_record(fixtures_dir)])
    assert batch["pixel_values_depth"].shape == (1, 3, 32, 32)
    assert "pixel_values" not in batch
    depth_tokens = batch["input_ids"] == 516
    assert int(depth_tokens.sum()) == with_depth.image_num_tokens()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.image_projector[0].weight.grad.abs().sum() > 0  # the depth map reached the LLM
    groups = model.token_modalities(batch["input_ids"], batch["attention_mask"])
    assert bool((groups[depth_tokens] == token_groups().index("depth")).all())


def test_data_and_evaluation_see_the_new_modality(with_depth, fixtures_dir):
    first, second = depth_record(fixtures_dir, "a"), depth_record(fixtures_dir, "b")
    second["depth"] = "elsewhere.png"
    assert record_modalities(first) == ["depth"]
    swapped = swap_media([first, second], seed=0)
    assert swapped[0]["depth"] == second["depth"] and swapped[1]["depth"] == first["depth"]

"""The command line, runs over damaged data, upcycling options, pretrained-part loading and activation
checkpointing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from training_helpers import OVERFIT, QUIET, TINY, Pipeline
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM, WhisperModel

from unimoe import UniMoeForConditionalGeneration
from unimoe.cli_training import main as cli_main
from unimoe.data.dataset import SupervisedDataset
from unimoe.modeling.beats import BEATsModel, save_official_checkpoint
from unimoe.presets import build_tiny
from unimoe.training import load_recipe
from unimoe.training.engine import Engine
from unimoe.training.recipe import ModelSpec
from unimoe.training.stages import configure_stage, load_model
from unimoe.training.trainer import Trainer


def test_training_goes_on_past_corrupt_and_missing_media(pipeline: Pipeline, tmp_path: Path) -> None:
    records = json.loads(pipeline.data.read_text())
    images = [r for r in records if r["task"] == "image_shape"]
    (tmp_path / "corrupt.png").write_bytes(b"GIF89a truncated")
    images[1] = {**images[1], "image": str(tmp_path / "corrupt.png")}
    images[2] = {**images[2], "image": "media/img/missing.png"}
    data = tmp_path / "damaged.json"
    data.write_text(json.dumps(images))
    out = tmp_path / "run"
    args = [f"data.train={data}", f"data.media_root={pipeline.data.parent}", f"train.output_dir={out}"]
    args += [*QUIET, "train.batch_size=2", "train.epochs=2", "train.log_every=1"]
    assert cli_main(["train", str(TINY / "stage1.yaml"), *args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped"] == 4  # 2 bad samples x 2 epochs
    assert any("corrupt.png" in e for e in summary["skipped_examples"])
    assert any("missing.png" in e for e in summary["skipped_examples"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped"] == 4
    assert (out / "final" / "config.json").is_file()


def test_cli_refuses_an_inconsistent_recipe(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.ERROR):
        code = cli_main(["train", str(TINY / "stage2.yaml"), "data.train=x.json", "experts=[]"])
    assert code == 2 and "non-empty 'experts' list" in caplog.text


def test_cli_exit_code_tells_unusable_data_from_bad_configuration(tmp_path: Path, caplog) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("[{not json")
    with caplog.at_level(logging.ERROR):
        code = cli_main(["train", str(TINY / "stage1.yaml"), f"data.train={broken}", *QUIET])
    assert code == 3 and "broken.json" in caplog.text and "input data" in caplog.text
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    args = ["train", str(TINY / "stage1.yaml"), f"data.train={empty}", f"train.output_dir={tmp_path / 'o'}"]
    assert cli_main([*args, *QUIET]) == 3


def test_upcycle_cli_options(pipeline: Pipeline, tmp_path: Path) -> None:
    image, speech = (str(p) for p in pipeline.stage2.expert_files[::2])
    args = ["upcycle", "--base", str(pipeline.stage1.final_dir), "--experts", "base", image, image, speech]
    args += ["--out", str(tmp_path), "--moe-layers", "1", "--top-k", "1", "--expert-lora-rank", "2"]
    args += ["--router", "softmax_topk"]
    assert cli_main(args) == 0
    model = UniMoeForConditionalGeneration.from_pretrained(tmp_path)
    text = model.config.text_config
    assert text.moe_layer_indices() == [1] and text.num_experts == 4 and text.num_experts_per_tok == 1
    assert text.router == "softmax_topk" and text.expert_lora_rank == 2
    base = UniMoeForConditionalGeneration.from_pretrained(pipeline.stage1.final_dir).text_model()
    experts = model.model.language_model.layers[1].mlp.experts
    assert torch.equal(experts.up_proj[0], base.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(experts.up_proj[1], experts.up_proj[2])
    assert torch.equal(experts.up_proj[3], load_file(speech)["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(
        model.model.language_model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight
    )
    assert (experts.up_proj_lora_B == 0).all()


def test_config_preset_loads_pretrained_parts(tmp_path: Path) -> None:
    reference, processor = build_tiny(seed=5, moe_layers="none")
    text = reference.config.text_config
    llm = LlamaForCausalLM(
        LlamaConfig(**{k: getattr(text, k) for k in LlamaConfig.__dataclass_fields__ if hasattr(text, k)})
    )
    llm.load_state_dict(reference.text_model().state_dict())
    llm.save_pretrained(tmp_path / "llm")
    processor.tokenizer.save_pretrained(tmp_path / "llm")
    clip = CLIPVisionModel(reference.config.vision_config)
    clip.load_state_dict(reference.model.vision_tower.state_dict())
    clip.save_pretrained(tmp_path / "clip")
    whisper = WhisperModel(reference.config.speech_config)
    whisper.encoder.load_state_dict(reference.model.speech_encoder.state_dict())
    whisper.save_pretrained(tmp_path / "whisper")
    save_official_checkpoint(reference.model.audio_encoder, tmp_path / "beats.pt")
    spec = ModelSpec(
        config_preset="tiny",
        text_overrides={"moe_layers": "none"},
        llm_path=str(tmp_path / "llm"),
        vision_path=str(tmp_path / "clip"),
        speech_path=str(tmp_path / "whisper"),
        audio_path=str(tmp_path / "beats.pt"),
        seed=6,
    )
    model, loaded_processor = load_model(spec)
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        parts = ("language_model.", "vision_tower.", "speech_encoder.", "audio_encoder.")
        if name.startswith(tuple(f"model.{p}" for p in parts)) or name.startswith("lm_head."):
            assert torch.equal(tensor, expected[name]), name
    decoder = model.model.speech_connector.decoder.state_dict()
    assert all(torch.equal(v, whisper.decoder.state_dict()[k]) for k, v in decoder.items())
    assert loaded_processor.placeholder_ids == processor.placeholder_ids
    assert isinstance(BEATsModel.from_official_checkpoint(tmp_path / "beats.pt"), BEATsModel)


def test_activation_checkpointing_gives_the_same_losses(pipeline: Pipeline, tmp_path: Path) -> None:
    losses = []
    for flag in (False, True):
        recipe = load_recipe(
            TINY / "stage1.yaml",
            [
                f"data.train={pipeline.data}",
                f"train.output_dir={tmp_path / str(flag)}",
                "data.tasks=[image_shape]",
            ]
            + [
                *QUIET,
                *OVERFIT,
                "train.max_steps=2",
                "train.batch_size=2",
                f"train.gradient_checkpointing={flag}",
            ],
        )
        torch.manual_seed(0)
        model, processor = load_model(recipe.model)
        module = configure_stage(recipe, model)
        dataset = SupervisedDataset.from_file(pipeline.data, processor, tasks=["image_shape"])
        trainer = Trainer(recipe, Engine("none", "fp32"), module, processor, dataset)
        losses.append(trainer.fit().losses)
        layers = model.model.language_model.layers
        assert all(layer.gradient_checkpointing == flag for layer in layers)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)

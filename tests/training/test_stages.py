"""The three stages on the tiny model: losses fall, exactly the intended parameters train, the stage-2
files feed upcycling, and the merged stage-3 checkpoint loads and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import ABLATION, OVERFIT, QUIET, TINY, Pipeline

from unimoe import UniMoeForConditionalGeneration
from unimoe.data.dataset import Collator, SupervisedDataset, load_records
from unimoe.modeling.upcycling import extract_ffn_state_dict
from unimoe.processing.processor import UniMoeProcessor
from unimoe.training import RecipeError, load_recipe, train
from unimoe.training.engine import Engine
from unimoe.training.recipe import ModelSpec
from unimoe.training.stages import (
    configure_stage,
    load_model,
    merge_for_release,
    parameter_groups,
    unwrap_peft,
)
from unimoe.training.trainer import Trainer
from unimoe.training.upcycle import widen


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_frozen_and_trained(before: dict, module: torch.nn.Module, must_change: tuple[str, ...]) -> None:
    """Frozen parameters are bit-identical; trainable ones whose group is in ``must_change`` all moved."""
    groups = parameter_groups(module)
    for name, p in module.named_parameters():
        same = torch.equal(before[name], p.detach())
        if not p.requires_grad:
            assert same, f"frozen parameter {name} changed"
        elif groups[name] in must_change:
            assert not same, f"trainable parameter {name} did not change"


def test_stage1_trains_only_connectors(pipeline: Pipeline) -> None:
    losses = pipeline.stage1.losses
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    initial, _ = load_model(ModelSpec(preset="tiny", text_overrides={"moe_layers": "none"}))
    final = UniMoeForConditionalGeneration.from_pretrained(pipeline.stage1.final_dir)
    start, end = initial.state_dict(), final.state_dict()
    for name, tensor in end.items():
        if name.startswith("model.image_projector."):
            assert not torch.equal(start[name], tensor), f"{name} did not train"
        elif not name.startswith(("model.speech_connector.", "model.audio_connector.")):
            assert torch.equal(start[name], tensor), f"{name} changed in stage 1"


def test_stage2_writes_one_ffn_and_connector_file_per_expert(pipeline: Pipeline) -> None:
    result = pipeline.stage2
    names = ["image", "video", "speech", "audio"]
    assert [p.stem for p in result.expert_files] == names
    base = extract_ffn_state_dict(
        UniMoeForConditionalGeneration.from_pretrained(pipeline.stage1.final_dir).text_model()
    )
    ffns = [load_file(str(p)) for p in result.expert_files]
    for ffn in ffns:
        assert (
            set(ffn)
            == set(base)
            == {
                f"model.layers.{i}.mlp.{p}.weight"
                for i in (0, 1)
                for p in ("gate_proj", "up_proj", "down_proj")
            }
        )
        assert all(not torch.equal(ffn[k], base[k]) for k in base)
    connectors = {p.stem: set(load_file(str(p))) for p in result.connector_files}
    assert all(k.startswith("image_projector.") for k in connectors["image"] | connectors["video"])
    assert all(k.startswith("speech_connector.") for k in connectors["speech"])
    assert all(k.startswith("audio_connector.") for k in connectors["audio"])
    for i in range(4):  # each expert's own data: its loss falls over its steps
        own = result.losses[4 * i : 4 * i + 4]
        assert own[-1] < own[0], (names[i], own)
    manifest = json.loads((result.output_dir / "experts.json").read_text())
    assert [e["name"] for e in manifest["experts"]] == names


def test_stage2_freezes_attention_and_other_connectors(pipeline: Pipeline, tmp_path: Path) -> None:
    recipe = load_recipe(
        TINY / "stage2.yaml",
        [
            f"data.train={pipeline.data}",
            f"model.path={pipeline.stage1.final_dir}",
            f"train.output_dir={tmp_path}",
        ]
        + [*QUIET, *OVERFIT, "train.max_steps=2", "train.batch_size=4", "optim.lr=1e-2"],
    )
    model, processor = load_model(recipe.model)
    module = configure_stage(recipe, model, ["speech_connector"])
    groups = parameter_groups(module)
    trainable = {groups[n] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"ffn", "connectors"}
    assert all(
        n.startswith("model.speech_connector.")
        for n, p in module.named_parameters()
        if p.requires_grad and groups[n] == "connectors"
    )
    records = [r for r in load_records(pipeline.data) if r["task"] == "speech_word"]
    before = _params(module)
    Trainer(
        recipe,
        Engine("none", "fp32"),
        module,
        processor,
        SupervisedDataset(records, processor, pipeline.data.parent),
    ).fit()
    _assert_frozen_and_trained(before, module, ("ffn",))


def test_upcycled_model_holds_the_stage2_experts(pipeline: Pipeline) -> None:
    model = UniMoeForConditionalGeneration.from_pretrained(pipeline.upcycled)
    base = UniMoeForConditionalGeneration.from_pretrained(pipeline.stage1.final_dir)
    text = model.config.text_config
    assert text.num_experts == 4 and text.moe_layer_indices() == [0, 1]
    for slot, path in enumerate(pipeline.stage2.expert_files):
        ffn = load_file(str(path))
        experts = model.model.language_model.layers[1].mlp.experts
        assert torch.equal(experts.down_proj[slot], ffn["model.layers.1.mlp.down_proj.weight"])
    state, base_state = model.state_dict(), base.state_dict()
    for name, tensor in state.items():
        if name.startswith(
            (
                "model.vision_tower.",
                "model.speech_encoder.",
                "model.audio_encoder.",
                "model.language_model.layers.0.self_attn",
            )
        ):
            assert torch.equal(tensor, base_state[name]), name
    image = [load_file(str(p)) for p in pipeline.stage2.connector_files[:2]]  # image and video experts
    key = "image_projector.0.weight"  # connector files hold the connectors' keys within UniMoeModel
    torch.testing.assert_close(state[f"model.{key}"], (image[0][key] + image[1][key]) / 2)
    audio = load_file(str(pipeline.stage2.connector_files[3]))
    key = "audio_connector.projector.weight"
    assert torch.equal(state[f"model.{key}"], audio[key])


def test_stage3_trains_and_writes_a_merged_checkpoint_that_generates(pipeline: Pipeline) -> None:
    result = pipeline.stage3
    assert len(result.losses) == 6
    assert _mean(result.losses[-2:]) < _mean(result.losses[:2]) - 0.05, result.losses
    assert all(a > 0 for a in result.aux_losses)
    model = UniMoeForConditionalGeneration.from_pretrained(result.final_dir)
    processor = UniMoeProcessor.from_pretrained(result.final_dir)
    assert model.config.text_config.expert_lora_rank == 0
    assert not any("lora" in name for name in model.state_dict())
    base = UniMoeForConditionalGeneration.from_pretrained(pipeline.upcycled)
    for name, tensor in base.state_dict().items():
        encoders = ("model.vision_tower.", "model.speech_encoder.", "model.audio_encoder.")
        if name.startswith(encoders) or "embed_tokens" in name:
            assert torch.equal(tensor, model.state_dict()[name]), name
        if name.startswith("model.language_model.") and name.endswith(
            ("mlp.gate.weight", "self_attn.q_proj.weight")
        ):
            assert not torch.equal(tensor, model.state_dict()[name]), name
    record = load_records(pipeline.data)[0]
    inputs = processor(
        [{**record, "conversations": record["conversations"][:1]}],
        add_generation_prompt=True,
        media_root=pipeline.data.parent,
    )
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_stage3_frozen_parameters_and_lora_merge(pipeline: Pipeline, tmp_path: Path) -> None:
    recipe = load_recipe(
        TINY / "stage3.yaml",
        [f"data.train={pipeline.data}", f"model.path={pipeline.upcycled}", f"train.output_dir={tmp_path}"]
        + [*QUIET, *OVERFIT, "train.max_steps=2", "train.batch_size=4", "optim.lr=1e-2", "data.max_samples=4"]
        + ["unified.lora.dropout=0", "unified.expert_lora.dropout=0"],
    )
    from unimoe.training.run import _build

    module, processor = _build(recipe)
    groups = parameter_groups(module)
    trainable = {groups[n] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"connectors", "routers", "lora", "expert_lora"}
    dataset = SupervisedDataset.from_file(pipeline.data, processor, max_samples=4)
    before = _params(module)
    Trainer(recipe, Engine("none", "fp32"), module, processor, dataset).fit()
    _assert_frozen_and_trained(before, module, ("routers", "lora", "expert_lora"))
    batch = Collator(processor)([dataset[i] for i in range(4)]).inputs
    module.eval()
    with torch.no_grad():
        expected = module(**batch).logits
        merged = merge_for_release(module)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-4, rtol=1e-4)
    assert unwrap_peft(merged) is merged


@pytest.mark.parametrize(
    ("recipe", "dense", "message"),
    [
        (TINY / "stage3.yaml", True, "upcycle"),
        (TINY / "stage2.yaml", False, "dense"),
        (ABLATION / "mixed-dense.yaml", False, "stage 'unified'"),
    ],
)
def test_stages_refuse_the_wrong_kind_of_model(
    pipeline: Pipeline, tmp_path: Path, recipe: Path, dense: bool, message: str
) -> None:
    model = pipeline.stage1.final_dir if dense else pipeline.upcycled
    overrides = [f"data.train={pipeline.data}", f"model.path={model}", f"train.output_dir={tmp_path}"]
    with pytest.raises(RecipeError, match=message):
        train(recipe, [*overrides, *QUIET])


def test_stage3_metrics_log_routing_per_modality(pipeline: Pipeline) -> None:
    lines = [
        json.loads(line) for line in (pipeline.stage3.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [e["step"] for e in lines] == list(range(1, 7))
    for key in ("epoch", "loss", "lm_loss", "aux_loss", "lr", "tokens_per_s", "skipped", "expert_tokens"):
        assert key in lines[0], key
    routing = lines[0]["expert_tokens"]
    assert set(routing) == {"layer_0", "layer_1"}
    per_modality = routing["layer_0"]
    assert len(per_modality["text"]) == 4 and sum(per_modality["image"]) > 0
    # top-2: every counted token fills two expert slots, the same number in every layer
    totals = [sum(sum(v) for v in layer.values()) for layer in routing.values()]
    assert totals[0] == totals[1] and totals[0] % 2 == 0
    assert any((pipeline.stage3.output_dir / "tb").iterdir())


def test_stage2_keeps_order_and_trains_a_repeated_expert_once(pipeline: Pipeline, tmp_path: Path) -> None:
    experts = "[{name: image, tasks: [image_shape]}, {name: audio, tasks: [audio_sound]}, {name: image, tasks: [image_shape]}]"
    overrides = [
        f"data.train={pipeline.data}",
        f"model.path={pipeline.stage1.final_dir}",
        f"train.output_dir={tmp_path}",
    ]
    result = train(TINY / "stage2.yaml", [*overrides, *QUIET, f"experts={experts}", "train.max_steps=1"])
    assert [p.stem for p in result.expert_files] == ["image", "audio", "image"]
    assert result.steps == 2 and len(result.losses) == 2


def test_preset_recipe_builds_the_same_model_as_build_tiny() -> None:
    from unimoe.presets import build_tiny

    from_recipe, _ = load_model(ModelSpec(preset="tiny", seed=3))
    built, _ = build_tiny(seed=3)
    for (name, a), b in zip(from_recipe.state_dict().items(), built.state_dict().values()):
        assert torch.equal(a, b), name


def test_instruct_stage_tunes_a_widened_dense_model(pipeline: Pipeline, tmp_path: Path) -> None:
    wide = widen(pipeline.stage1.final_dir, tmp_path / "wide", 2)
    base = UniMoeForConditionalGeneration.from_pretrained(pipeline.stage1.final_dir)
    assert UniMoeForConditionalGeneration.from_pretrained(wide).config.text_config.intermediate_size == (
        2 * base.config.text_config.intermediate_size
    )
    overrides = [f"data.train={pipeline.data}", f"model.path={wide}", *QUIET, *OVERFIT, "train.batch_size=4"]
    recipe = load_recipe(ABLATION / "mixed-dense.yaml", [*overrides, f"train.output_dir={tmp_path / 'r'}"])
    from unimoe.training.run import _build

    module, _ = _build(recipe)
    groups = parameter_groups(module)
    assert {groups[n] for n, p in module.named_parameters() if p.requires_grad} == {
        "connectors",
        "lora",
        "ffn",
    }
    frozen = load_recipe(
        ABLATION / "mixed-dense.yaml",
        [*overrides, f"train.output_dir={tmp_path / 'f'}", "unified.experts=frozen"],
    )
    module, _ = _build(frozen)
    groups = parameter_groups(module)
    assert {groups[n] for n, p in module.named_parameters() if p.requires_grad} == {"connectors", "lora"}

    result = train(
        ABLATION / "mixed-dense.yaml",
        [*overrides, f"train.output_dir={tmp_path / 'out'}", "train.max_steps=6", "optim.lr=1e-2"],
    )
    assert _mean(result.losses[-2:]) < _mean(result.losses[:2]), result.losses
    model = UniMoeForConditionalGeneration.from_pretrained(result.final_dir)
    assert not model.config.text_config.moe_layer_indices()
    assert not any("lora" in name for name in model.state_dict())
    tuned = model.state_dict()
    for name, tensor in UniMoeForConditionalGeneration.from_pretrained(wide).state_dict().items():
        trained = ("mlp.up_proj.weight", "self_attn.q_proj.weight")  # the FFN fully, attention by LoRA
        if name.startswith("model.language_model.") and name.endswith(trained):
            assert not torch.equal(tensor, tuned[name]), name
        if name.startswith("model.vision_tower.") or "embed_tokens" in name:
            assert torch.equal(tensor, tuned[name]), name


def test_cached_encoder_outputs_train_as_the_encoders_do(
    pipeline: Pipeline, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stage 3 for two epochs over every modality, with and without ``data.cache_features``: the same
    losses (fp32; cached rows may round differently from rows of a larger batch), and the second epoch
    reuses the first one's encoder outputs."""
    common = [
        f"data.train={pipeline.data}",
        f"model.path={pipeline.upcycled}",
        *QUIET,
        *OVERFIT,
        "train.batch_size=4",
        "data.max_samples=8",
        "data.group_by_modality=false",
        "train.epochs=2",
        "data.cache_encoded=true",
    ]
    plain = train(TINY / "stage3.yaml", [*common, f"train.output_dir={tmp_path / 'plain'}"])
    with caplog.at_level("INFO", logger="unimoe.training.trainer"):
        cached = train(
            TINY / "stage3.yaml",
            [*common, f"train.output_dir={tmp_path / 'cached'}", "data.cache_features=true"],
        )
    assert len(plain.losses) == 4
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    reused = [r.getMessage() for r in caplog.records if "frozen encoder outputs" in r.getMessage()]
    assert reused, "no line on the reused encoder outputs"
    hits, misses = (int(w) for w in reused[-1].split() if w.isdigit())
    assert hits == misses > 0  # the second epoch reuses every item of the first
    with pytest.raises(RecipeError, match="cache_features"):
        load_recipe(TINY / "stage3.yaml", [*common[:-1], "data.cache_features=true"])

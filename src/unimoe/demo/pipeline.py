"""``unimoe demo``: the whole system at small scale, on synthetic multimodal data it makes itself.

Steps: synthesise the data set (real PNG, mp4 and wav files), build the tiny model and its tokenizer,
stage 0 (encoder pre-training, see below), a text warm-up of the LLM, stage 1 (connector alignment),
stage 2 (one dense FFN expert per modality), upcycling into a 4-expert MoE, stage 3 (unified MoE tuning
with LoRA), then held-out evaluation next to chance and a media-swap control, the routing figure, the
loss curves and ``report.json`` in ``runs/demo/``. Jobs that do not depend on each other run side by
side on one core each (``run_stages``).

No pretrained weights can be downloaded, so the demo makes up for the two things the real system
gets from pretraining, on data of its own that is disjoint from the instruction set:

- Stage 0 gives the tiny encoders the objective of the model each stands in for
  (``unimoe.demo.encoder_pretraining``): CLIP's image-caption contrastive loss, Whisper's
  transcription loss, BEATs' sound tagging. They are frozen afterwards, as in the paper. Speech
  pre-training hears only the training voices.
- The text warm-up teaches the tiny LLM the chat template, the answer words, and to answer from what
  its context says: it reads the instruction records with every media placeholder replaced by a
  caption of the media (``"a red circle."``), the part a pretrained LLaMA brings. Stage 1 then
  teaches the connectors to say with media what the captions said with words.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from ..evaluation.accuracy import evaluate
from ..evaluation.routing import plot_losses, plot_routing, routing_counts
from ..inference import GenerationParams, UniMoeEngine
from ..modalities import media_names, placeholder_pattern, token_groups
from ..presets import build_tiny
from ..seeding import seed_everything
from ..training import train, upcycle
from .background import Background
from .encoder_pretraining import OBJECTIVES, pretrain_encoders
from .synth import pretraining_corpus, synthesize
from .synth_media import SOUNDS

logger = logging.getLogger("unimoe.demo")
PLACEHOLDER_LINE = re.compile(placeholder_pattern().pattern + r"\n?")
RECIPES = Path(str(files("unimoe") / "recipes" / "tiny"))
# At this scale stage 3 trains the experts fully (in-expert LoRA learns too little in the steps the demo
# has) with LoRA on attention only; everything else is the shipped recipe.
CACHES = ("data.cache_encoded=true", "data.cache_features=true")  # encode each sample once, run
# the frozen encoders once per media item

STAGE3_CHOICES = (
    "unified.experts=full",
    "unified.lora.rank=16",
    "unified.lora.alpha=32",
    "unified.lora.dropout=0",
    "unified.lora.targets=[q_proj, k_proj, v_proj, o_proj]",
)


@dataclass
class DemoSettings:
    """Sizes and step counts of the demo; ``quick`` shrinks everything for tests."""

    out_dir: str = "runs/demo"
    seed: int = 0
    quick: bool = False
    n_train: int = 600
    n_heldout: int = 40
    batch_size: int = 16
    text_steps: int = 1500
    stage1_steps: int = 1000
    stage2_steps: int = 300
    stage3_steps: int = 1200
    encoder_steps: dict[str, int] = field(
        default_factory=lambda: {"vision": 3000, "speech": 600, "audio": 200}
    )
    clip_frames: int = 4  # frames of each clip a CLIP pre-training step encodes (of 8)
    # how many times the text warm-up's data holds each record of a task (default once): in words, the
    # other tasks copy an answer from the caption, while the cross-modal one compares two of them
    text_repeats: dict[str, int] = field(default_factory=lambda: {"cross_speech_image": 5})
    corpus: dict[str, int] = field(
        default_factory=lambda: {"n_images": 6000, "n_clips": 2000, "n_speech": 600, "n_sounds": 1000}
    )
    lr: dict[str, float] = field(
        default_factory=lambda: {"text": 1e-3, "stage1": 3e-3, "stage2": 2e-3, "stage3": 1e-3}
    )

    def __post_init__(self) -> None:
        if self.quick:
            self.n_train, self.n_heldout = 128, 8
            self.text_steps, self.stage1_steps, self.stage2_steps, self.stage3_steps = 150, 100, 60, 400
            self.encoder_steps = {"vision": 300, "speech": 100, "audio": 200}
            self.corpus = {"n_images": 600, "n_clips": 200, "n_speech": 120, "n_sounds": 200}
            # short stages need the larger rates the full run gave up for steadier learning
            self.lr = {"text": 3e-3, "stage1": 3e-3, "stage2": 2e-3, "stage3": 2e-3}


def train_recipe(
    recipe: str | Path | Mapping[str, Any],
    out: Path,
    steps: int,
    lr: float,
    seed: int,
    batch_size: int,
    *overrides: str,
):
    """Runs the recipe ``recipe`` (a file or its contents) through ``train()``, as ``unimoe train``
    would, with the run length, paths and logging of a short experiment as ``key=value`` overrides
    (``overrides`` last)."""
    return train(
        recipe,
        [
            f"train.output_dir={out}",
            f"train.seed={seed}",
            f"train.batch_size={batch_size}",
            f"train.max_steps={steps}",
            "train.log_every=10",
            "train.save_every=null",
            "train.tensorboard=true",
            "train.distributed=none",
            f"optim.lr={lr}",
            "optim.scheduler=cosine",
            "optim.warmup_ratio=0.05",
            *overrides,
        ],
    )


def _train(
    recipe: str | Mapping[str, Any], out: Path, steps: int, lr: float, settings: DemoSettings, *overrides: str
):
    """The shipped tiny recipe ``recipe`` (a file name, or its contents) with the demo's seed and batch
    size (``train_recipe``)."""
    source = RECIPES / recipe if isinstance(recipe, str) else recipe
    return train_recipe(source, out, steps, lr, settings.seed, settings.batch_size, *overrides)


def _train_experts_on_two_cores(out: Path, settings: DemoSettings, *overrides: str):
    """Stage 2 with its experts shared between this process and a forked one (``Background``): they
    are independent, and the fork inherits the samples that stage 1 encoded. The other core's experts
    are trained in ``out/other-core`` and moved into ``out``; a last run of the whole recipe in ``out``
    with ``train.resume=true`` finds them all trained, writes ``experts.json`` and returns the result
    of all of them, in the recipe's order. ``out`` starts empty (no experts or logs of an earlier run)."""
    shutil.rmtree(out, ignore_errors=True)
    recipe = yaml.safe_load((RECIPES / "stage2.yaml").read_text())
    here, there = recipe["experts"][0::2], recipe["experts"][1::2]
    steps, lr = settings.stage2_steps, settings.lr["stage2"]
    elsewhere = out / "other-core"
    start = time.time()
    other_core = Background(
        _train,
        {**recipe, "experts": there},
        elsewhere,
        steps,
        lr,
        settings,
        *overrides,
        log=out.parent / "other-core.log",
        name="stage 2 experts " + ", ".join(e["name"] for e in there),
    )
    _train({**recipe, "experts": here}, out, steps, lr, settings, *overrides)
    other_core.result()
    for folder in ("experts", "connectors"):
        for path in (elsewhere / folder).iterdir():
            path.replace(out / folder / path.name)
    with open(out / "metrics.jsonl", "a") as log:
        log.write((elsewhere / "metrics.jsonl").read_text())
    if (elsewhere / "tb").is_dir():
        for path in (elsewhere / "tb").iterdir():
            path.replace(out / "tb" / path.name)
    shutil.rmtree(elsewhere)
    result = _train(recipe, out, steps, lr, settings, *overrides, "train.resume=true")
    result.wall_seconds = time.time() - start  # not the sum of the experts' times
    return result


def captioned(records: list[dict]) -> list[dict]:
    """Records with each media placeholder replaced by its caption: the LLM's own (text) pre-training
    data, which teaches it to answer from what the context says, as a pretrained LLaMA can."""
    out = []
    for r in records:
        captions = iter(r["captions"])
        turns = [{**t, "value": _fill_placeholders(t["value"], captions)} for t in r["conversations"]]
        out.append({"id": r["id"], "task": r["task"], "conversations": turns})
    return out


def _fill_placeholders(text: str, captions) -> str:
    """``text`` with each placeholder line replaced by the next of ``captions`` as a sentence."""
    return PLACEHOLDER_LINE.sub(lambda _: f"{next(captions)}.\n", text)


def run_stages(settings: DemoSettings, data_dir: Path, out: Path) -> dict[str, Any]:
    """The data set, stage 0, text warm-up, stages 1-3 and upcycling; returns the stage results
    (``encoders``: the stage-0 loss curves, ``data``: the data set's summary).

    Until stage 1, two jobs run side by side on one core each (``Background``): here the CLIP
    pre-training of the vision tower; in a forked process the data set, the Whisper and BEATs
    pre-training and the text warm-up (``_data_and_language``). Nothing of one feeds the other: the
    warm-up trains the LLM alone, and the vision tower joins its result before stage 1.
    """
    results: dict[str, Any] = {}
    (out / "other-core.log").unlink(missing_ok=True)
    model, processor = build_tiny(seed=settings.seed, moe_layers="none")
    start = time.time()
    other_core = Background(
        _data_and_language,
        settings,
        model,
        processor,
        data_dir,
        out,
        log=out / "other-core.log",
        name="data + audio + text",
    )
    steps, corpus = settings.encoder_steps, settings.corpus
    vision_corpus = pretraining_corpus(settings.seed, corpus["n_images"], corpus["n_clips"], 0, 0)
    results["encoders"] = pretrain_encoders(
        model,
        processor,
        vision_corpus,
        {"vision": steps["vision"]},
        len(SOUNDS),
        seed=settings.seed,
        clip_frames=settings.clip_frames,
    )
    results["data"], audio_losses, results["text"] = other_core.result()
    results["encoders"].update(audio_losses)
    logger.info("encoder pre-training, data set and text warm-up took %.1f s", time.time() - start)
    # both folders get the trained vision tower: base (stage 0's model) and the warm-up's result
    for folder in (out / "base", results["text"].final_dir):
        _replace_vision_tower(folder, model)
    print("[2/4] stage 1 (alignment), stage 2 (experts), upcycling, stage 3 (unified MoE)")

    lr = settings.lr
    data = [f"data.train={data_dir / 'train.json'}", f"data.media_root={data_dir}", *CACHES]
    stage1_model = ["model.preset=null", f"model.path={results['text'].final_dir}"]
    results["stage1"] = _train(
        "stage1.yaml", out / "stage1", settings.stage1_steps, lr["stage1"], settings, *stage1_model, *data
    )
    stage1 = results["stage1"].final_dir
    results["stage2"] = _train_experts_on_two_cores(out / "stage2", settings, f"model.path={stage1}", *data)
    stage2 = results["stage2"]
    upcycled = upcycle(
        stage1,
        stage2.expert_files,
        out / "upcycled",
        connectors=stage2.connector_files,
        router="topk_softmax",
        top_k=2,
    )
    results["stage3"] = _train(
        "stage3.yaml",
        out / "stage3",
        settings.stage3_steps,
        lr["stage3"],
        settings,
        f"model.path={upcycled}",
        *data,
        *STAGE3_CHOICES,
    )
    return results


def _data_and_language(settings: DemoSettings, model, processor, data_dir: Path, out: Path):
    """The other core's share of the demo before stage 1: synthesise the data set, pre-train the
    speech and audio encoders (saved with the rest of ``model`` in ``out/base``), then the text warm-up
    from ``out/base``. Returns ``(data set summary, their loss curves, the warm-up's TrainResult)``."""
    summary = synthesize(data_dir, seed=settings.seed, n_train=settings.n_train, n_heldout=settings.n_heldout)
    records = json.loads((data_dir / "train.json").read_text())
    text_file = out / "captioned.json"
    repeats = settings.text_repeats
    text_records = [r for r in captioned(records) for _ in range(repeats.get(r["task"], 1))]
    text_file.write_text(json.dumps(text_records))
    corpus = settings.corpus
    audio_corpus = pretraining_corpus(settings.seed, 0, 0, corpus["n_speech"], corpus["n_sounds"])
    steps = {name: settings.encoder_steps[name] for name in ("speech", "audio")}
    losses = pretrain_encoders(model, processor, audio_corpus, steps, len(SOUNDS), seed=settings.seed)
    base = out / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    text = _train(
        "language.yaml",
        out / "text",
        settings.text_steps,
        settings.lr["text"],
        settings,
        f"model.path={base}",
        f"data.train={text_file}",
        "data.cache_encoded=true",
    )
    return summary, losses, text


def _replace_vision_tower(folder: Path, model) -> None:
    """Rewrites the model in ``folder`` with the vision tower of ``model``."""
    saved = type(model).from_pretrained(folder)
    saved.model.vision_tower.load_state_dict(model.model.vision_tower.state_dict())
    saved.save_pretrained(folder)


def answerer(engine: UniMoeEngine, media_root: Path, batch_size: int):
    """Greedy short answers for records, ``batch_size`` at a time: the ``evaluate`` callback."""
    params = GenerationParams(max_new_tokens=6, temperature=0.0)

    def answer(records: list[dict]) -> list[str]:
        texts: list[str] = []
        for i in range(0, len(records), batch_size):
            results = engine.generate(records[i : i + batch_size], params, media_root=media_root)
            texts.extend(r.text for r in results)
        return texts

    return answer


def routing(
    engine: UniMoeEngine,
    records: list[dict],
    media_root: Path,
    batch_size: int,
    first_choice_only: bool = False,
):
    """``routing_counts`` of ``engine``'s model over ``records`` (see there)."""
    processor = engine.processor
    batches = (
        processor(records[i : i + batch_size], media_root=media_root)
        for i in range(0, len(records), batch_size)
    )
    return routing_counts(engine.model, batches, first_choice_only)


def _stage_summary(result) -> dict[str, Any]:
    return {
        "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "skipped": result.skipped,
        "wall_seconds": round(result.wall_seconds, 1),
    }


def _print_table(tasks: dict[str, dict]) -> None:
    print(f"\n{'task':<20}{'accuracy':>10}{'chance':>9}{'control':>9}{'n':>5}")
    for name, row in tasks.items():
        print(
            f"{name:<20}{row['accuracy']:>10.3f}{row['chance']:>9.3f}{row['control_accuracy']:>9.3f}{row['n']:>5}"
        )


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Runs the whole demo and writes ``report.json``, ``routing.png`` and ``loss.png`` under ``out_dir``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    seed_everything(settings.seed)
    start = time.time()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    print(
        f"[1/4] on one core: stage 0 of the vision encoder (CLIP); on the other: the data set in {data_dir}, "
        f"stage 0 of the speech and audio encoders, the text warm-up (output in {out / 'other-core.log'})"
    )
    results = run_stages(settings, data_dir, out)
    summary = results.pop("data")
    final = results["stage3"].final_dir

    print(f"[3/4] evaluating {final} on the held-out split")
    engine = UniMoeEngine.load(str(final), device="cpu", dtype="float32")
    heldout = json.loads((data_dir / "heldout.json").read_text())
    report_tasks = evaluate(heldout, answerer(engine, data_dir, 32), control_seed=settings.seed)
    predictions = report_tasks.pop("_predictions")
    counts = routing(engine, heldout, data_dir, 32)

    print(f"[4/4] writing the report and figures in {out}")
    layers = engine.model.config.text_config.moe_layer_indices()
    experts = [path.stem for path in results["stage2"].expert_files]
    plot_routing(counts, out / "routing.png", layers, [f"{name} expert" for name in experts])
    encoder_losses = results.pop("encoders")
    curves = {
        **{f"stage 0: {OBJECTIVES[name]}": losses for name, losses in encoder_losses.items()},
        "text warm-up": results["text"].losses,
        "stage 1: align": results["stage1"].losses,
        "stage 2: experts": results["stage2"].losses,
        "stage 3: unified": results["stage3"].losses,
    }
    plot_losses(curves, out / "loss.png")
    report = {
        "tasks": report_tasks,
        "wall_seconds": round(time.time() - start, 1),
        "encoders": {
            name: {
                "objective": OBJECTIVES[name],
                "steps": len(losses),
                "first_loss": losses[0],
                "final_loss": losses[-1],
            }
            for name, losses in encoder_losses.items()
        },
        "stages": {name: _stage_summary(r) for name, r in results.items()},
        "routing": {
            "layers": layers,
            "modalities": token_groups(),
            "experts": experts,
            "token_slots": counts.tolist(),
        },
        "data": summary,
        "settings": asdict(settings),
        "final_model": str(final),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _print_table(report_tasks)
    print("\nExamples (held-out media):")
    shown = set()
    for record, prediction in zip(heldout, predictions):
        if (
            record["task"] in shown
            or len(shown) == 3
            or record["task"] not in ("image_shape", "speech_word", "video_direction")
        ):
            continue
        shown.add(record["task"])
        media = {k: record[k] for k in media_names() if k in record}
        question = record["conversations"][0]["value"].split("\n")[-1]
        print(f"  {media} {question!r} -> {prediction!r} (gold {record['conversations'][-1]['value']!r})")
    print(
        f"\nDone in {report['wall_seconds']:.0f} s. Report: {out / 'report.json'}; figures: routing.png, loss.png"
    )
    print("Chat with the result:")
    print(f"  .venv/bin/unimoe chat --model {final}")
    print(f"  .venv/bin/unimoe serve --model {final} --media-root {data_dir}")
    print("Or in the browser (then open http://127.0.0.1:7860):")
    print(f"  .venv/bin/unimoe web --model {final} --examples {data_dir / 'heldout.json'}")
    return report

"""``run_ablation``: every variant over every seed on one data set, then the report.

Layout under ``out_dir``::

    data/                     the suite (train.json, heldout.json, media/), unless ``data_dir`` is given:
                              training records of the suite's tasks and of the perception tasks,
                              held-out records of the suite's tasks
    encoders/                 stage 0: the tiny model with pre-trained encoders (seed ``data_seed``),
                              unless ``base`` is given; the encoders are the same for every seed
    seed{S}/base, text, stage1, stage2     per seed: the LLM from seed S, text warm-up, stage 1, stage 2
    seed{S}/{variant}/init, mixed, result.json
    report.json, report.md, accuracy.png, routing.png

A finished step (``summary.json`` or ``result.json`` present) is reused on the next run, so an
interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from ..demo.encoder_pretraining import pretrain_encoders
from ..demo.pipeline import RECIPES, answerer, captioned, routing, train_recipe
from ..demo.synth import pretraining_corpus, synthesize
from ..demo.synth_media import SOUNDS
from ..evaluation.accuracy import evaluate
from ..inference import UniMoeEngine
from ..modeling.modeling_unimoe import UniMoeForConditionalGeneration
from ..presets import build_tiny
from ..seeding import seed_everything
from ..training import upcycle
from ..training.upcycle import BASE_FFN, widen
from . import suite
from .report import write_report
from .variants import VARIANTS_DIR, VariantSpec, shipped_variants

logger = logging.getLogger("unimoe.ablation")
STAGE2_RECIPE = VARIANTS_DIR.parent / "stage2.yaml"
ENCODER_PREFIXES = ("model.vision_tower.", "model.speech_encoder.", "model.audio_encoder.")


@dataclass
class AblationSettings:
    """What to run. The defaults are the pre-registered full run (``suite``); ``quick`` shrinks every
    size and step count for a smoke test of the whole path (one seed)."""

    out_dir: str = "runs/ablation"
    seeds: list[int] = field(default_factory=lambda: list(suite.SEEDS))
    variants: list[str] | None = None  # names from variants_dir; None: all
    variants_dir: str = str(VARIANTS_DIR)
    data_dir: str | None = None  # an existing data set (train.json, heldout.json); None: the suite
    perception_counts: dict[str, int] = field(default_factory=lambda: dict(suite.PERCEPTION_COUNTS))
    base: str | None = None  # a dense model with pre-trained encoders; None: stage 0 here
    quick: bool = False
    data_seed: int = 0
    train_counts: dict[str, int] = field(default_factory=lambda: dict(suite.TRAIN_COUNTS))
    n_heldout: int = suite.HELDOUT_PER_TASK
    batch_size: int = suite.BATCH_SIZE
    steps: dict[str, int] = field(default_factory=lambda: dict(suite.STEPS))
    lr: dict[str, float] = field(default_factory=lambda: dict(suite.LEARNING_RATES))
    encoder_steps: dict[str, int] = field(
        default_factory=lambda: {"vision": 3000, "speech": 600, "audio": 500}
    )
    corpus: dict[str, int] = field(
        default_factory=lambda: {"n_images": 6000, "n_clips": 2000, "n_speech": 600, "n_sounds": 1000}
    )
    bootstrap_samples: int = suite.BOOTSTRAP_SAMPLES

    def __post_init__(self) -> None:
        if self.quick:
            self.seeds = self.seeds[:1]
            self.train_counts = dict.fromkeys(self.train_counts, 6)
            self.perception_counts = dict.fromkeys(self.perception_counts, 4)
            self.n_heldout = 4
            self.batch_size = 8
            self.steps = {"text": 20, "stage1": 10, "stage2": 4, "mixed": 10}
            self.encoder_steps = {"vision": 20, "speech": 10, "audio": 10}
            self.corpus = {"n_images": 40, "n_clips": 12, "n_speech": 24, "n_sounds": 20}
            self.bootstrap_samples = 200


def _summary(out: Path, run) -> dict[str, Any]:
    """The ``summary.json`` of the training run in ``out``, from disk if it finished before; else
    ``run()`` trains it first."""
    done = out / "summary.json"
    if not done.is_file():
        run()
    return json.loads(done.read_text())


class _Seed:
    """One seed's shared steps and its variants; ``out`` is ``out_dir/seed{S}``."""

    def __init__(self, settings: AblationSettings, seed: int, data_dir: Path, base: Path):
        self.settings, self.seed, self.data_dir, self.base = settings, seed, data_dir, base
        self.out = Path(settings.out_dir) / f"seed{seed}"
        self.data = [
            f"data.train={data_dir / 'train.json'}",
            f"data.media_root={data_dir}",
            "data.cache_encoded=true",
        ]
        # stage 1 aligns on the perception tasks of the synthetic suite; on other data, on all of it
        self.align = [*self.data] + (
            [f"data.tasks=[{', '.join(settings.perception_counts)}]"] if settings.data_dir is None else []
        )

    def _train(self, recipe: Path, out: Path, stage: str, *overrides: str, steps: int | None = None) -> dict:
        s = self.settings
        steps = s.steps[stage] if steps is None else steps
        lr = s.lr["mixed" if stage.startswith("mixed") else stage]
        return _summary(
            out, lambda: train_recipe(recipe, out, steps, lr, self.seed, s.batch_size, *overrides)
        )

    def stage1(self) -> Path:
        """The seed's LLM and connectors, text warm-up (unless ``base`` was given) and stage 1."""
        start = self.base
        if self.settings.base is None:
            start = _seeded_base(self.base, self.seed, self.out / "base")
            text_file = self.out / "captioned.json"
            records = json.loads((self.data_dir / "train.json").read_text())
            text_file.write_text(json.dumps(captioned(records)))
            text = self._train(
                RECIPES / "language.yaml",
                self.out / "text",
                "text",
                f"model.path={start}",
                f"data.train={text_file}",
                "data.cache_encoded=true",
            )
            start = Path(text["final_dir"])
        stage1 = self._train(
            RECIPES / "stage1.yaml",
            self.out / "stage1",
            "stage1",
            "model.preset=null",
            f"model.path={start}",
            *self.align,
        )
        return Path(stage1["final_dir"])

    def stage2(self, stage1: Path) -> dict:
        return self._train(STAGE2_RECIPE, self.out / "stage2", "stage2", f"model.path={stage1}", *self.data)

    def variant(self, spec: VariantSpec, stage1: Path, stage2: dict | None, heldout: list[dict]) -> dict:
        """Builds, tunes and scores one variant; its ``result.json`` is reused when present."""
        out = self.out / spec.name
        done = out / "result.json"
        if done.is_file():
            return json.loads(done.read_text())
        seed_everything(self.seed)
        init, experts = _initial_model(spec, stage1, stage2, out / "init")
        budget = self.settings.steps["mixed"]
        if not spec.uses_stage2:  # the stage-2 budget goes to the mixed stage
            budget += self.settings.steps["stage2"] * len(_stage2_experts())
        extra = [f"unified.aux_loss_coef={spec.aux_loss_coef}"] if spec.is_moe else []
        mixed = self._train(
            spec.mixed, out / "mixed", "mixed", f"model.path={init}", *self.data, *extra, steps=budget
        )
        start = time.time()
        engine = UniMoeEngine.load(str(mixed["final_dir"]), device="cpu", dtype="float32")
        tasks = evaluate(heldout, answerer(engine, self.data_dir, 32), control_seed=self.seed)
        tasks.pop("_predictions")
        before = stage2 if spec.uses_stage2 and stage2 else {"steps": 0, "wall_seconds": 0.0}
        result: dict[str, Any] = {
            "variant": spec.name,
            "seed": self.seed,
            "tasks": tasks,
            "train": {
                "mixed_steps": mixed["steps"],
                "stage2_steps": before["steps"],
                "samples": (mixed["steps"] + before["steps"]) * self.settings.batch_size,
                "final_loss": mixed["losses"][-1] if mixed["losses"] else None,
                "wall_seconds": round(mixed["wall_seconds"] + before["wall_seconds"], 1),
            },
            "parameters": _parameter_counts(engine.model),
        }
        if spec.is_moe:
            counts = routing(engine, heldout, self.data_dir, 32, first_choice_only=True)
            result["routing"] = {
                "layers": engine.model.config.text_config.moe_layer_indices(),
                "experts": experts,
                "first_choice_counts": counts.tolist(),
            }
        result["eval_seconds"] = round(time.time() - start, 1)
        done.write_text(json.dumps(result, indent=1))
        return result


def _stage2_experts() -> list[str]:
    """The stage-2 expert names of the ablation's stage-2 recipe, in order."""
    from ..training import load_recipe

    return [e.name for e in load_recipe(STAGE2_RECIPE, ["data.train=unused.json"]).experts]


def _initial_model(spec: VariantSpec, stage1: Path, stage2: dict | None, out: Path) -> tuple[Path, list[str]]:
    """The variant's model before the mixed stage and its expert names (one per slot)."""
    done = out / "experts.json"  # written last
    if done.is_file():
        return out, json.loads(done.read_text())
    if spec.init == "widened":
        widen(stage1, out, spec.top_k)
        names: list[str] = []
    else:
        if spec.init == "base":
            files, connectors = [BASE_FFN] * spec.num_experts, []
            names = [f"copy {i}" for i in range(spec.num_experts)]  # of the stage-1 FFN
        else:
            assert stage2 is not None
            per_slot = spec.num_experts // len(stage2["expert_files"])
            if per_slot * len(stage2["expert_files"]) != spec.num_experts:
                raise ValueError(
                    f"variant {spec.name}: num_experts {spec.num_experts} is not a multiple of the "
                    f"{len(stage2['expert_files'])} stage-2 experts"
                )
            files = [f for f in stage2["expert_files"] for _ in range(per_slot)]
            connectors = stage2["connector_files"]
            names = [Path(f).stem for f in files]
        upcycle(stage1, files, out, connectors=connectors, router=spec.router, top_k=spec.top_k)
    done.write_text(json.dumps(names))
    return out, names


def _parameter_counts(model: UniMoeForConditionalGeneration) -> dict[str, int]:
    """Language-model parameters in total and active per token (top-k of the experts)."""
    text = model.config.text_config
    lm = model.model.language_model
    total = sum(p.numel() for p in lm.parameters()) + model.lm_head.weight.numel()
    expert = sum(p.numel() for n, p in lm.named_parameters() if ".experts." in n)
    active = total - expert
    if text.moe_layer_indices():
        active += expert * text.num_experts_per_tok // text.num_experts
    return {"language_model": total, "active_per_token": active}


def _seeded_base(encoders: Path, seed: int, out: Path) -> Path:
    """The tiny model drawn with ``seed`` carrying the pre-trained encoders of ``encoders``."""
    if (out / "config.json").is_file():
        return out
    model, processor = build_tiny(seed=seed, moe_layers="none")
    pretrained = load_file(str(encoders / "model.safetensors"))
    state = {k: v for k, v in pretrained.items() if k.startswith(ENCODER_PREFIXES)}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{encoders}: unexpected encoder weights {result.unexpected_keys[:5]}")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _stage0(settings: AblationSettings, out: Path) -> tuple[Path, float]:
    """The tiny model (seed ``data_seed``) with encoders pre-trained as in the demo; reused if present."""
    if (out / "config.json").is_file():
        return out, 0.0
    start = time.time()
    model, processor = build_tiny(seed=settings.data_seed, moe_layers="none")
    corpus = pretraining_corpus(seed=settings.data_seed, **settings.corpus)
    pretrain_encoders(model, processor, corpus, settings.encoder_steps, len(SOUNDS), seed=settings.data_seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out, time.time() - start


def _synthesize_suite(settings: AblationSettings, data_dir: Path) -> None:
    """The suite's tasks and the perception tasks for training; the suite's tasks alone held out."""
    counts = {**settings.train_counts, **settings.perception_counts}
    synthesize(
        data_dir, seed=settings.data_seed, n_train=counts, n_heldout=settings.n_heldout, tasks=list(counts)
    )
    missing = [name for name in ("train.json", "heldout.json") if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"ablate: {data_dir} has no {' or '.join(missing)}")
    heldout = json.loads((data_dir / "heldout.json").read_text())
    kept = [r for r in heldout if r["task"] in settings.train_counts]
    (data_dir / "heldout.json").write_text(json.dumps(kept, indent=1) + "\n")


def run_ablation(settings: AblationSettings) -> dict[str, Any]:
    """Runs the ablation and writes ``report.json``, ``report.md`` and the figures; returns the report."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.time()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    available = shipped_variants(settings.variants_dir)
    if not available:
        raise ValueError(f"no variant files (*.yaml) in {settings.variants_dir}")
    names = settings.variants or list(available)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; {settings.variants_dir} has {list(available)}")
    variants = [available[n] for n in names]

    if settings.data_dir is not None and settings.base is None:
        raise ValueError(
            "ablate: --data needs --base, a dense model with pre-trained encoders (stage 0 and the "
            "text warm-up are made for the synthetic suite)"
        )
    if settings.data_dir is None:
        data_dir = out / "data"
        if not (data_dir / "heldout.json").is_file():
            _synthesize_suite(settings, data_dir)
    else:
        data_dir = Path(settings.data_dir)
    missing = [name for name in ("train.json", "heldout.json") if not (data_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"ablate: {data_dir} has no {' or '.join(missing)}")
    heldout = json.loads((data_dir / "heldout.json").read_text())
    if settings.base is None:
        base, stage0_seconds = _stage0(settings, out / "encoders")
    else:
        base, stage0_seconds = Path(settings.base), 0.0

    results = []
    for seed in settings.seeds:
        logger.info("seed %d: stage 1 and the variants %s", seed, names)
        runner = _Seed(settings, seed, data_dir, base)
        stage1 = runner.stage1()
        stage2 = runner.stage2(stage1) if any(v.uses_stage2 for v in variants) else None
        for spec in variants:
            results.append(runner.variant(spec, stage1, stage2, heldout))
            logger.info("seed %d, %s: %s", seed, spec.name, _accuracy_line(results[-1]))
    invocations = _log_invocation(out, names, settings.seeds, time.time() - start, stage0_seconds)
    return write_report(out, results, variants, asdict(settings), invocations)


def _log_invocation(out: Path, variants: list[str], seeds: list[int], seconds: float, stage0: float) -> list:
    """Appends this run to ``invocations.json`` (a resumed ablation's wall time is the sum of its runs')
    and returns the whole list."""
    path = out / "invocations.json"
    runs = json.loads(path.read_text()) if path.is_file() else []
    runs.append(
        {
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "variants": variants,
            "seeds": list(seeds),
            "wall_seconds": round(seconds, 1),
            "stage0_seconds": round(stage0, 1),
        }
    )
    path.write_text(json.dumps(runs, indent=1))
    return runs


def _accuracy_line(result: dict) -> str:
    return ", ".join(f"{task} {row['accuracy']:.2f}" for task, row in result["tasks"].items())

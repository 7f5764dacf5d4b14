"""The training loop shared by all stages.

Design: a small loop on ``accelerate`` (plus ``fully_shard`` and DeepSpeed, see ``engine``) rather
than transformers' ``Trainer``. The loop is short enough to read in one sitting, and it owns the
things this project needs to be exact about:

- bad samples: the collator drops unusable samples and the loop counts and reports them; a process
  whose micro-batch lost every sample still runs a zero-weight step, so collectives stay in step;
- loss normalisation: each micro-batch's token-summed loss is divided by the number of target tokens
  of the whole optimizer step over all processes, so one process with batch 4 and two processes with
  batch 2 (or 4 accumulated micro-batches) compute the same loss and gradient;
- atomic checkpoints with the exact data position and every RNG state, so a resumed run repeats the
  uninterrupted run's losses;
- per-modality routing statistics from the router outputs of every step.

``Trainer`` was the alternative; its dataloader, checkpoint layout and loss scaling would each have
needed overriding to get the points above.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..compat import enable_activation_checkpointing
from ..data.dataset import Collator, SupervisedDataset, TrainBatch
from ..data.sampler import GroupedBatchSampler
from ..errors import UniMoeInputError
from ..modalities import connector_names, media
from ..modeling.feature_cache import FrozenFeatureCache
from ..modeling.modeling_unimoe import is_frozen
from ..modeling.modeling_unimoe_text import combine_losses
from ..processing.processor import UniMoeProcessor
from ..seeding import seed_everything
from .checkpoint import (
    STATE_FILE,
    atomic_checkpoint,
    latest_checkpoint,
    load_rng,
    read_state,
    remove_stale,
    save_rng,
    write_json,
)
from .engine import Engine
from .metrics import MetricsLogger, RoutingStats, Throughput
from .optim import build_optimizer, build_scheduler
from .recipe import Recipe, RecipeError
from .stages import unwrap_peft

logger = logging.getLogger(__name__)


class StepModule(nn.Module):
    """The model as the loop runs it: router outputs on, token-normalised loss, and a zero-weight pass
    through every trainable connector whose media is absent from the batch, so that every process
    uses (and reduces gradients for) the same parameters at every step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _connector_probes(self, inputs: dict[str, torch.Tensor]) -> list[nn.Module]:
        """Trainable connectors that no modality of this batch feeds."""
        base = unwrap_peft(self.model).model
        fed = {m.connector for m in media() if m.input_key in inputs}
        probes = []
        for name in connector_names():
            module = getattr(base, name, None)
            if module is not None and name not in fed and not is_frozen(module):
                probes.append(module)
        return probes

    def forward(self, num_items_in_batch: float, **inputs: torch.Tensor):
        """Returns ``(model output, zero-valued tensor tied to the otherwise unused connectors)``."""
        out = self.model(
            **inputs, output_router_logits=True, num_items_in_batch=num_items_in_batch, logits_at_labels=True
        )
        touch = out.lm_loss.new_zeros(())
        for module in self._connector_probes(inputs):
            ref = next(module.parameters())
            probe = torch.zeros(1, 1, module.input_width, dtype=ref.dtype, device=ref.device)  # [1, 1, in]
            touch = touch + module(probe).float().sum() * 0.0
        return out, touch


@dataclass
class TrainResult:
    """What a run produced. ``losses`` has one entry per optimizer step (including steps run before a
    resume); ``skipped`` counts unusable samples over all processes."""

    output_dir: Path
    final_dir: Path | None
    losses: list[float]
    skipped: int
    steps: int
    wall_seconds: float
    lm_losses: list[float] = field(default_factory=list)
    aux_losses: list[float] = field(default_factory=list)
    skipped_examples: list[str] = field(default_factory=list)
    resumed_from: int | None = None
    expert_files: list[Path] = field(default_factory=list)
    connector_files: list[Path] = field(default_factory=list)


def decoder_layers(module: nn.Module) -> list[nn.Module]:
    """The LLM's decoder layers (the FSDP2 sharding units)."""
    return list(unwrap_peft(module).model.language_model.layers)


class Trainer:
    """Runs one recipe's loop on one model and dataset; ``tag`` names a sub-run (a stage-2 expert)."""

    def __init__(
        self,
        recipe: Recipe,
        engine: Engine,
        model: nn.Module,
        processor: UniMoeProcessor,
        dataset: SupervisedDataset,
        tag: str | None = None,
    ):
        self.recipe = recipe
        self.engine = engine
        self.model = model
        self.processor = processor
        self.dataset = dataset
        self.tag = tag
        self.output_dir = Path(recipe.train.output_dir)
        self.ckpt_root = self.output_dir / "checkpoints" / (tag or "")
        if len(dataset) == 0:
            raise UniMoeInputError(
                f"no training samples{f' for expert {tag!r}' if tag else ''} in {recipe.data.train}"
            )
        t = recipe.train
        self.sampler = GroupedBatchSampler(
            dataset.modality_groups(),
            dataset.lengths(),
            t.batch_size,
            engine.world_size,
            engine.rank,
            seed=t.seed,
            shuffle=t.shuffle,
            group_by_modality=recipe.data.group_by_modality,
            group_by_length=recipe.data.group_by_length,
        )
        self.steps_per_epoch = math.ceil(len(self.sampler) / t.grad_accum)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        base = unwrap_peft(model)
        text = base.config.text_config
        self.routing = RoutingStats(text.moe_layer_indices(), text.num_experts)
        self.aux_coef = text.router_aux_loss_coef
        self.z_coef = text.router_z_loss_coef
        self.state = {"step": 0, "epoch": 0, "position": 0, "losses": [], "lm_losses": [], "aux_losses": []}
        self.state.update(skipped=0, skipped_examples=[], tokens=0, wall_seconds=0.0, layout=self._layout())

    # setup -------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        t = self.recipe.train
        seed_everything(t.seed + self.engine.rank)  # dropout and router noise differ per process
        if t.gradient_checkpointing:
            enable_activation_checkpointing(unwrap_peft(self.model), {"use_reentrant": False})
        self.module = StepModule(self.model)
        self.engine.setup(
            self.module,
            lambda params: build_optimizer(params, self.recipe.optim),
            lambda opt: build_scheduler(opt, self.recipe.optim, self.total_steps),
            decoder_layers(self.model),
            t.batch_size,
            t.grad_accum,
            self.recipe.optim.max_grad_norm,
            unwrap_peft(self.model).config.text_config.hidden_size,
        )

    def _resume(self) -> int | None:
        mode = self.recipe.train.resume
        if self.engine.is_main:
            remove_stale(self.ckpt_root)
        self.engine.barrier()
        if mode is False:
            return None
        found = latest_checkpoint(self.ckpt_root)
        if found is None:
            if mode is True:
                raise RecipeError(f"train.resume=true but there is no checkpoint under {self.ckpt_root}")
            return None
        state = read_state(found)
        layout = self._layout()
        if state.get("layout", layout) != layout:
            raise RecipeError(
                f"{found} was written with {state['layout']}, this run has {layout}: resume with the same "
                "batch size, accumulation, process count and seed, or start a new train.output_dir"
            )
        self.engine.load(found)
        load_rng(found, self.engine.rank)
        self.state = state
        logger.info("resumed from %s (step %d)", found, self.state["step"])
        return self.state["step"]

    def _layout(self) -> dict[str, int]:
        """What the data order of a run depends on; a resumed run must match it."""
        t = self.recipe.train
        return {
            "batch_size": t.batch_size,
            "grad_accum": t.grad_accum,
            "processes": self.engine.world_size,
            "seed": t.seed,
        }

    # the loop ----------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Trains to ``total_steps``; returns the run's result (``final_dir`` is set by the caller)."""
        self._prepare()
        resumed = self._resume()
        t = self.recipe.train
        metrics = MetricsLogger(
            self.output_dir,
            self.engine.is_main,
            self.total_steps,
            self.state["step"],
            t.tensorboard,
            t.progress,
            self.tag,
        )
        metrics.truncate_after(self.state["step"])
        collator = Collator(self.processor)
        started = time.perf_counter() - self.state["wall_seconds"]
        window = Throughput()
        self.module.train()
        inner = unwrap_peft(self.model).model
        for encoder in inner.encoders():
            if is_frozen(encoder):
                encoder.eval()  # a frozen encoder's features carry no dropout or layer drop
        if self.recipe.data.cache_features:
            inner.feature_cache = FrozenFeatureCache()
        try:
            self._run(collator, metrics, window, started)
        finally:
            if inner.feature_cache is not None:
                cache, inner.feature_cache = inner.feature_cache, None
                logger.info("frozen encoder outputs: %d items reused, %d encoded", cache.hits, cache.misses)
                cache.clear()
        metrics.close()
        return self._result(resumed, started)

    def _run(self, collator: Collator, metrics: MetricsLogger, window: Throughput, started: float) -> None:
        """Epochs until ``total_steps``."""
        while self.state["step"] < self.total_steps:
            before = self.state["step"]
            if self._run_epoch(collator, metrics, window, started):
                if self.state["step"] == before and self.state["position"] > 0:
                    raise UniMoeInputError(
                        f"{self.recipe.data.train}: no usable sample in a whole epoch "
                        f"({self.state['skipped']} skipped)"
                    )
                self.state["epoch"] += 1
                self.state["position"] = 0

    def _run_epoch(
        self, collator: Collator, metrics: MetricsLogger, window: Throughput, started: float
    ) -> bool:
        """Trains from the current data position; True when the epoch's data ran out."""
        t = self.recipe.train
        self.sampler.set_epoch(self.state["epoch"], start=self.state["position"])
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=collator,
            num_workers=self.recipe.data.num_workers,
            generator=torch.Generator().manual_seed(t.seed + self.state["epoch"]),  # not the global RNG
        )
        batches = iter(loader)
        while self.state["step"] < self.total_steps:
            micro = list(islice(batches, t.grad_accum))
            if not micro:
                return True
            self.state["position"] += len(micro)
            self._count(micro, window)
            step_out = self._train_step(micro)
            if step_out is not None:
                self._record(step_out, metrics, window, started)
        return len(self.sampler) <= self.state["position"]

    def _train_step(self, micro: list[TrainBatch]) -> dict[str, float] | None:
        """One optimizer step over ``micro``; returns the step's global loss terms, or None when no
        process has a single usable target token (the step is then not taken)."""
        engine = self.engine
        local_targets = sum(b.target_tokens for b in micro)
        targets = engine.all_reduce_sum(torch.tensor(float(local_targets), device=engine.device))
        if float(targets) == 0:
            return None
        per_process_items = max(float(targets), 1.0) / engine.world_size
        sums = torch.zeros(2, device=engine.device)  # [lm, aux] over micro-batches
        accum = len(micro)
        for i, batch in enumerate(micro):
            inputs = {k: v.to(engine.device) for k, v in batch.inputs.items()}
            cache = unwrap_peft(self.model).model.feature_cache
            with engine.sync_context(sync=i == accum - 1):
                with cache.batch(batch.media_items) if cache is not None else contextlib.nullcontext():
                    out, touch = engine.forward(num_items_in_batch=per_process_items, **inputs)
                weight = 0.0 if batch.filler else 1.0 / accum
                loss = combine_losses(
                    out.lm_loss, out.aux_loss, out.z_loss, self.aux_coef, self.z_coef, weight
                )
                engine.backward(loss + touch)
            sums[0] += out.lm_loss.detach().float()
            if out.router_logits:
                sums[1] += weight * out.aux_loss.detach().float()
                base = unwrap_peft(self.model)
                self.routing.update(
                    out.expert_indices, base.token_modalities(inputs["input_ids"], inputs["attention_mask"])
                )
        grad_norm = engine.step()
        sums = engine.all_reduce_sum(sums) / engine.world_size
        lm, aux = float(sums[0]), float(sums[1])
        return {"loss": lm + self.aux_coef * aux, "lm_loss": lm, "aux_loss": aux, "grad_norm": grad_norm}

    def _count(self, micro: list[TrainBatch], window: Throughput) -> None:
        """Adds the micro-batches' skipped samples and tokens (over all processes) to the state."""
        s, engine = self.state, self.engine
        skipped = [k for b in micro for k in b.skipped]
        room = max(0, 20 - len(s["skipped_examples"]))
        s["skipped_examples"] += [f"{k.record_id}: {k.reason}" for k in skipped][:room]
        local = [len(skipped), sum(b.tokens for b in micro)]
        counts = engine.all_reduce_sum(torch.tensor(local, device=engine.device, dtype=torch.float64))
        s["skipped"] += int(counts[0])
        s["tokens"] += int(counts[1])
        window.add(int(counts[1]))

    def _record(self, step_out: dict, metrics: MetricsLogger, window: Throughput, started: float) -> None:
        """Updates the state with one step, logs, and checkpoints when due."""
        s, t, engine = self.state, self.recipe.train, self.engine
        s["step"] += 1
        s["losses"].append(step_out["loss"])
        s["lm_losses"].append(step_out["lm_loss"])
        s["aux_losses"].append(step_out["aux_loss"])
        if s["step"] % t.log_every == 0 or s["step"] == self.total_steps:
            rate = window.rate_and_reset()
            entry = {
                "step": s["step"],
                "epoch": s["epoch"],
                **step_out,
                "lr": engine.lr,
                "tokens_per_s": rate,
            }
            entry["skipped"] = s["skipped"]
            if self.routing.active:
                entry["expert_tokens"] = self.routing.reduce_and_reset(engine)
            metrics.log(entry)
            metrics.advance(step_out["loss"], step_out["aux_loss"], rate)
        else:
            metrics.advance(step_out["loss"], step_out["aux_loss"], None)
        if t.save_every and (s["step"] % t.save_every == 0 or s["step"] == self.total_steps):
            s["wall_seconds"] = time.perf_counter() - started
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Writes an atomic checkpoint of the current step."""
        engine = self.engine
        with atomic_checkpoint(
            self.ckpt_root,
            self.state["step"],
            engine.is_main,
            engine.barrier,
            self.recipe.train.keep_checkpoints,
        ) as tmp:
            engine.save(tmp)
            save_rng(tmp, engine.rank)
            engine.barrier()
            if engine.is_main:
                write_json(tmp / STATE_FILE, self.state)
        return self.ckpt_root

    def _result(self, resumed: int | None, started: float) -> TrainResult:
        s = self.state
        if s["skipped"]:
            logger.warning(
                "%d sample(s) skipped; first: %s", s["skipped"], "; ".join(s["skipped_examples"][:3])
            )
        return TrainResult(
            output_dir=self.output_dir,
            final_dir=None,
            losses=list(s["losses"]),
            skipped=s["skipped"],
            steps=s["step"],
            wall_seconds=time.perf_counter() - started,
            lm_losses=list(s["lm_losses"]),
            aux_losses=list(s["aux_losses"]),
            skipped_examples=list(s["skipped_examples"]),
            resumed_from=resumed,
        )

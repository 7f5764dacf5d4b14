"""The demo's two most run training steps, before and after their speed work, side by side.

- ``stage3``: one optimizer step of stage 3 on the tiny upcycled MoE model as the demo trains it
  (experts trained fully, LoRA on attention, routers and connectors trained, encoders frozen) on a
  batch of 16 mixed-task demo samples. Before: the whole CLIP tower (its last layer computed for
  nothing), one ``masked_scatter`` per modality to place the media features, the LM head over every
  position, the MoE experts through ``torch._grouped_mm`` on every token (padding too), attention
  under a ``[B, 1, L, L]`` padding mask, AdamW's per-parameter loop and per-tensor gradient
  clipping. After: the training loop's path (CLIP up to its feature layer, one scatter for all
  media, the LM head at labelled positions only, the per-expert MoE path on real tokens only, causal
  attention without a padding mask on the right-padded batch, fused AdamW, multi-tensor clipping,
  and the frozen encoders' outputs kept per media item: ``data.cache_features``, with which the
  demo runs its encoders once per item, in the first epoch; the timed steps are later-epoch steps).
- ``clip``: one step of stage 0's CLIP pre-training of the tiny vision tower (64 images and 32
  8-frame clips). Before: the whole tower (its last layer computed for nothing), SDPA attention,
  images and clip frames in two passes, the text tower on all 96 captions, AdamW's loop and
  per-tensor clipping. After: ``ClipObjective`` (the tower up to the feature layer, eager attention,
  one pass, the text tower once per distinct caption) with fused AdamW and multi-tensor clipping.
  A third row, ``after, 4 frames``, is the step the demo runs: the same with 4 evenly spaced frames
  of each clip (``DemoSettings.clip_frames``). It does less work, so its ratio to ``before`` is not
  a speed-up of the same step; the summary keeps it apart (``clip_demo_frames_speedup``).

Both versions start from the same weights; each round times each once, alternating; medians over
``--repeats`` rounds.

``two jobs``: the demo runs independent jobs side by side, one thread each (``unimoe.demo.background``),
because a second thread speeds up such small steps little. This times two jobs of about equal length
(``--job-steps`` of the demo's CLIP step and as many stage-3 "after" steps as take the same time) one
after the other on ``--threads`` threads against side by side on one thread each, alternating, over
``--job-rounds`` rounds. ``--profile`` adds the ``torch.profiler`` table of the top operators of each
version and a table of where each step's time goes (data loading, the forward of each part, the
backward, the optimizer). Data loading is not in the timed steps (the demo encodes its records once
per run and collates the cached samples afterwards); the table times it on its own.

Run: ``python benchmarks/demo_steps.py [--quick] [--profile] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import Case, environment, format_table, interleaved_times, write_json
from torch import nn

from unimoe.data.dataset import Collator, SupervisedDataset
from unimoe.demo.background import Background
from unimoe.demo.encoder_pretraining import ClipObjective
from unimoe.demo.pipeline import RECIPES, STAGE3_CHOICES, DemoSettings
from unimoe.demo.synth import pretraining_corpus, synthesize
from unimoe.modeling.feature_cache import FrozenFeatureCache
from unimoe.modeling.modeling_unimoe import UniMoeModel
from unimoe.modeling.modeling_unimoe_text import combine_losses
from unimoe.modeling.moe import GroupedExperts, UniMoeSparseMoeBlock
from unimoe.presets import build_tiny
from unimoe.training.optim import build_optimizer, clip_gradients
from unimoe.training.recipe import OptimSpec, load_recipe
from unimoe.training.run import _build
from unimoe.training.stages import unwrap_peft
from unimoe.training.trainer import StepModule

SPEC = OptimSpec(lr=1e-3, weight_decay=0.0, max_grad_norm=1.0)
DEMO_FRAMES = f"after, {DemoSettings.clip_frames} frames"  # the demo's CLIP step: fewer frames per clip


class LegacyClipObjective(ClipObjective):
    """The CLIP pre-training step as it was: the whole tower with SDPA, two passes per step, the text
    tower on every caption."""

    def __init__(self, tower, *args, feature_layer: int = -2, **kwargs):
        full = -1  # ClipObjective keeps the layers up to its feature layer: all of them here
        super().__init__(tower, *args, feature_layer=full, **kwargs)
        self.feature_layer = feature_layer
        self.clip.set_attn_implementation("sdpa")

    def similarity(self, text_embeds, frames, counts):
        """``frames`` ``[B, F, 3, H, W]``: features at ``feature_layer`` from every layer's states."""
        vision_model = self.clip.vision_model
        states = vision_model(pixel_values=frames.flatten(0, 1), output_hidden_states=True).hidden_states
        tokens = self.clip.visual_projection(vision_model.post_layernorm(states[self.feature_layer][:, 1:]))
        tokens = nn.functional.normalize(tokens.reshape(frames.shape[0], -1, tokens.shape[-1]), dim=-1)
        return torch.einsum("td,ipd->tip", text_embeds, tokens).mean(-1)

    def loss(self, index):
        caption_index, picked = self.captions_for(index)
        text_embeds = self.text_embeddings(self.text_of[caption_index])  # every caption, repeats too
        scores = self.similarity(text_embeds, self.pixel_values[index].unsqueeze(1), None)
        clip_scores = self.similarity(text_embeds, self.clip_pixel_values[picked], None)
        return self.contrastive(torch.cat([scores, clip_scores], dim=1))


def legacy_embed_inputs(
    self: UniMoeModel, input_ids: torch.Tensor, **media: torch.Tensor | None
) -> torch.Tensor:
    """Media features placed as before: one ``masked_scatter`` per modality, each a full copy of the
    embeddings (and a ``masked_select`` in the backward). Well-formed batches only."""
    placeholders = self.config.placeholder_ids()
    is_placeholder = sum(input_ids == token_id for token_id in placeholders.values()).bool()
    embeds = self.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))
    features = self.media_embeddings(**media)
    for modality, token_id in placeholders.items():
        if modality in features:
            mask = (input_ids == token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(mask, features[modality].to(embeds.dtype))
    return embeds


def legacy_encode_images(
    self: UniMoeModel, pixel_values: torch.Tensor, modality: str = "image"
) -> torch.Tensor:
    """CLIP features as before: the whole tower (its later layers computed for nothing), the feature
    layer picked from every layer's recorded hidden states."""
    tower, _ = self._parts(modality)
    with self._encoder_context(tower):
        out = tower(pixel_values.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.vision_feature_layer][:, 1:]


def legacy_optimizer(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW as built before: torch's default on CPU, a Python loop over parameters."""
    return torch.optim.AdamW(params, lr=SPEC.lr, fused=False, foreach=False)


class Step:
    """Loss, backward, clipping and an AdamW step, then gradients to None.

    ``parts``: the modules whose forward ``phase_times`` times on its own, by label; ``data``: the
    data loading that comes before the step, by label (timed on its own, not in the step)."""

    def __init__(
        self,
        params: list[nn.Parameter],
        loss: Callable[[], torch.Tensor],
        fast: bool,
        parts: dict[str, list[nn.Module]] | None = None,
        data: dict[str, Callable[[], Any]] | None = None,
    ):
        self.params, self.loss, self.fast = params, loss, fast
        self.parts, self.data = parts or {}, data or {}
        self.optimizer = build_optimizer(params, SPEC) if fast else legacy_optimizer(params)

    def __call__(self) -> None:
        self.loss().backward()
        self.update()

    def update(self) -> None:
        """Clipping, the optimizer step and zeroing the gradients."""
        if self.fast:
            clip_gradients(self.params, SPEC.max_grad_norm)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, SPEC.max_grad_norm, foreach=False)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def clip_steps(args: argparse.Namespace) -> dict[str, Step]:
    """Stage 0's CLIP step, before and after, on one corpus and the same tower weights."""
    model, processor = build_tiny(seed=0, moe_layers="none")
    corpus = pretraining_corpus(seed=0, n_images=256, n_clips=64, n_speech=0, n_sounds=0)
    pixels = torch.stack([processor.featurize("image", image)[0] for image in corpus.images])
    clips = torch.stack([processor.featurize("video", list(clip))[0] for clip in corpus.clips])
    data = (pixels, corpus.captions, processor.tokenizer, clips, corpus.clip_captions)
    tower = model.model.vision_tower
    generator = torch.Generator().manual_seed(0)
    index = torch.randint(len(pixels), (64,), generator=generator)
    before, after = LegacyClipObjective(tower, *data), ClipObjective(tower, *data)
    demo = ClipObjective(tower, *data, clip_frames=DemoSettings.clip_frames)
    # the same text tower and projections (built at random for the occasion) in all
    missing, _ = before.clip.load_state_dict(after.clip.state_dict(), strict=False)
    assert all(k.startswith("vision_model.encoder.layers.") for k in missing), missing
    steps = {}
    for version, objective in (("before", before), ("after", after), (DEMO_FRAMES, demo)):
        clip = objective.clip
        parts = {"forward: text tower": [clip.text_model], "forward: vision tower": [clip.vision_model]}
        steps[version] = Step(
            list(clip.parameters()), lambda o=objective: o.loss(index), version != "before", parts
        )
    return steps


def stage3_steps(args: argparse.Namespace, data_dir: Path, work: Path) -> dict[str, Step]:
    """Stage 3's step, before and after, on one batch and the same weights."""
    model, processor = build_tiny(seed=0)
    model.save_pretrained(work / "upcycled")
    processor.save_pretrained(work / "upcycled")
    overrides = [f"model.path={work / 'upcycled'}", f"data.train={data_dir / 'train.json'}", *STAGE3_CHOICES]
    recipe = load_recipe(RECIPES / "stage3.yaml", overrides)
    module, processor = _build(recipe)
    records = json.loads((data_dir / "train.json").read_text())
    dataset = SupervisedDataset(records, processor, data_dir)
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randperm(len(dataset), generator=generator)[: args.batch_size].tolist()
    collate = Collator(processor)
    samples = [dataset[i] for i in chosen]
    batch = collate(samples)
    data = {  # the demo caches encoded samples: the first epoch encodes, the later ones only collate
        "data: read + encode media, collate (first epoch)": lambda: collate([dataset[i] for i in chosen]),
        "data: collate cached samples (later epochs)": lambda: collate(samples),
    }
    coef = module.base_model.model.config.text_config
    positions = torch.arange(batch.inputs["input_ids"].shape[1])[None]
    steps = {}
    for version in ("before", "after"):
        step_module = StepModule(copy.deepcopy(module)).train()
        fast = version == "after"
        if not fast:
            inner = unwrap_peft(step_module.model).model
            inner.embed_inputs = types.MethodType(legacy_embed_inputs, inner)
            inner.encode_images = types.MethodType(legacy_encode_images, inner)
            for part in step_module.modules():
                if isinstance(part, GroupedExperts):
                    part.dispatch = "grouped_mm"
                if isinstance(part, UniMoeSparseMoeBlock):  # padding tokens through the experts too
                    part.forward = lambda hidden, token_mask=None, forward=part.forward: forward(hidden)

        inner = unwrap_peft(step_module.model).model
        for encoder in inner.encoders():  # frozen: the training loop runs them in eval mode
            encoder.eval()
        if fast:  # the frozen encoders' outputs kept per media item, from the first step on
            inner.feature_cache = FrozenFeatureCache()

        def loss(m: StepModule = step_module, fast: bool = fast) -> torch.Tensor:
            if fast:
                with unwrap_peft(m.model).model.feature_cache.batch(batch.media_items):
                    out, touch = m(num_items_in_batch=float(batch.target_tokens), **batch.inputs)
            else:  # positions passed: the padding mask reaches attention, as it did
                out = m.model(
                    **batch.inputs,
                    position_ids=positions,
                    output_router_logits=True,
                    num_items_in_batch=float(batch.target_tokens),
                )
                touch = 0.0
            total = combine_losses(
                out.lm_loss, out.aux_loss, out.z_loss, coef.router_aux_loss_coef, coef.router_z_loss_coef
            )
            return total + touch

        params = [p for p in step_module.parameters() if p.requires_grad]
        vision = inner.vision_tower  # its parts: the feature path calls them without the tower's forward
        vision_parts = [vision.embeddings, vision.pre_layrnorm, *vision.encoder.layers, vision.post_layernorm]
        parts = {
            "forward: frozen encoders": [*vision_parts, inner.speech_encoder, inner.audio_encoder],
            "forward: connectors": inner.connectors(),
            "forward: LLM decoder layers": list(inner.language_model.layers),
        }
        steps[version] = Step(params, loss, fast, parts, data)
    return steps


def check_same_loss(name: str, steps: dict[str, Step]) -> float:
    """Both versions' first loss (before any update) must agree to fp32 rounding: they compute one
    function. Returns the relative difference."""
    with torch.no_grad():
        before, after = (float(steps[v].loss()) for v in ("before", "after"))
    difference = abs(before - after) / abs(before)
    if difference > 1e-5:
        raise AssertionError(f"{name}: the versions' losses differ: before {before}, after {after}")
    return difference


def phase_times(step: Step, rounds: int) -> dict[str, float]:
    """Median milliseconds per phase of ``step`` over ``rounds`` steps: data loading (``step.data``),
    the forward of each of ``step.parts`` (forward hooks; ``forward: the rest`` is what remains: the
    embeddings, the LM head, the losses), the backward and the optimizer (clipping, update, zeroing)."""
    samples: dict[str, list[float]] = {name: [] for name in step.data}
    for name, load in step.data.items():
        for _ in range(rounds):
            start = time.perf_counter()
            load()
            samples[name].append(time.perf_counter() - start)
    spent: dict[str, float] = {}
    started: dict[int, float] = {}
    handles = []
    for label, modules in step.parts.items():
        for module in modules:
            key = id(module)
            handles.append(
                module.register_forward_pre_hook(
                    lambda *_, k=key: started.__setitem__(k, time.perf_counter())
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda *_, k=key, label=label: spent.__setitem__(
                        label, spent.get(label, 0.0) + time.perf_counter() - started[k]
                    )
                )
            )
    try:
        for _ in range(rounds):
            spent.clear()
            marks = [time.perf_counter()]
            loss = step.loss()
            marks.append(time.perf_counter())
            loss.backward()
            marks.append(time.perf_counter())
            step.update()
            marks.append(time.perf_counter())
            for label in step.parts:
                samples.setdefault(label, []).append(spent.get(label, 0.0))
            forward = marks[1] - marks[0]
            samples.setdefault("forward: the rest", []).append(forward - sum(spent.values()))
            samples.setdefault("backward", []).append(marks[2] - marks[1])
            samples.setdefault("optimizer", []).append(marks[3] - marks[2])
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def profile_table(step: Step, rounds: int, rows: int) -> str:
    """``torch.profiler``'s table of the top operators by their own CPU time over ``rounds`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def side_by_side(
    first: Step, second: Step, n_first: int, n_second: int, rounds: int, log: Path
) -> list[dict]:
    """Wall seconds of ``n_first`` steps of ``first`` and ``n_second`` of ``second``: one after the
    other on this process's threads, and side by side (``second`` in a forked process, one thread
    each); the order alternates per round. A result row per way, with medians."""

    def run(step: Step, n: int) -> None:
        for _ in range(n):
            step()

    times: dict[str, list[float]] = {"one after the other": [], "side by side, 1 thread each": []}
    for r in range(rounds):
        ways = list(times) if r % 2 == 0 else list(reversed(times))
        for way in ways:
            start = time.perf_counter()
            if way == "one after the other":
                run(first, n_first)
                run(second, n_second)
            else:
                job = Background(run, second, n_second, log=log, name="second job")
                run(first, n_first)
                job.result()
            times[way].append(time.perf_counter() - start)
    sequential = statistics.median(times["one after the other"])
    return [
        {
            "way": way,
            "seconds": statistics.median(values),
            "speedup": sequential / statistics.median(values),
            "samples_s": values,
        }
        for way, values in times.items()
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30, quick 3)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="stage-3 samples per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="print the top operators of each version")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--job-steps", type=int, default=None, help="CLIP steps per job (default 80, quick 4)"
    )
    parser.add_argument("--job-rounds", type=int, default=None, help="two-jobs rounds (default 6, quick 1)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 30)
    args.job_steps = args.job_steps or (4 if args.quick else 80)
    args.job_rounds = args.job_rounds or (1 if args.quick else 6)
    return args


def measure(name: str, steps: dict[str, Step], args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Both versions of one step timed side by side: a result row per version."""
    difference = check_same_loss(name, steps)
    cases = [Case(version, step) for version, step in steps.items()]
    times = interleaved_times(cases, args.repeats, args.warmup, device)
    medians = {version: statistics.median(values) for version, values in times.items()}
    return [
        {
            "step": name,
            "version": version,
            "step_ms": medians[version],
            "steps_per_s": 1e3 / medians[version],
            "speedup": medians["before"] / medians[version],
            "first_loss_relative_difference": difference,
            "samples_ms": times[version],
        }
        for version in steps
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    phases: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:  # the data-loading phase reads its media files
        work = Path(tmp)
        synthesize(work / "data", seed=0, n_train=8, n_heldout=0)
        workloads = {"stage3": stage3_steps(args, work / "data", work), "clip": clip_steps(args)}
        for name, steps in workloads.items():
            results += measure(name, steps, args, device)
            if args.profile:
                phases[name] = {
                    version: phase_times(step, rounds=args.repeats) for version, step in steps.items()
                }
                for version, step in steps.items():
                    profiles[f"{name}/{version}"] = profile_table(step, rounds=5, rows=15)
        # two jobs of about equal length, as the demo pairs them: as many stage-3 steps as take the time
        # of the CLIP steps
        ms = {(r["step"], r["version"]): r["step_ms"] for r in results}
        stage3_job_steps = max(1, round(args.job_steps * ms["clip", DEMO_FRAMES] / ms["stage3", "after"]))
        two_jobs = side_by_side(
            workloads["clip"][DEMO_FRAMES],
            workloads["stage3"]["after"],
            args.job_steps,
            stage3_job_steps,
            args.job_rounds,
            work / "second-job.log",
        )
    headers = ["step", "version", "ms/step", "steps/s", "speedup"]
    rows = [
        [r["step"], r["version"], r["step_ms"], r["steps_per_s"], f"{r['speedup']:.2f}x"] for r in results
    ]
    for title, table in profiles.items():
        sys.stdout.write(f"\n{title}: top operators over 5 steps\n{table}\n")
    for name, by_version in phases.items():
        labels = list(dict.fromkeys(label for times in by_version.values() for label in times))
        table = [[label, *(by_version[v].get(label, float("nan")) for v in by_version)] for label in labels]
        sys.stdout.write(f"\n{name}: where a step's time goes (median ms over {args.repeats} steps)\n")
        sys.stdout.write(format_table(["phase", *(f"{v} ms" for v in by_version)], table) + "\n\n")
    sys.stdout.write(format_table(headers, rows) + "\n")
    sys.stdout.write(
        f"\ntwo jobs: {args.job_steps} of the demo's CLIP steps and {stage3_job_steps} stage-3 steps "
        f"(median of {args.job_rounds} rounds)\n"
    )
    sys.stdout.write(
        format_table(
            ["way", "seconds", "speedup"],
            [[r["way"], r["seconds"], f"{r['speedup']:.2f}x"] for r in two_jobs],
        )
        + "\n"
    )
    if args.json:
        summary = {f"{r['step']}_speedup": r["speedup"] for r in results if r["version"] == "after"}
        summary.update(
            {f"{r['step']}_demo_frames_speedup": r["speedup"] for r in results if r["version"] == DEMO_FRAMES}
        )
        summary["two_jobs_side_by_side_speedup"] = two_jobs[1]["speedup"]
        payload = {
            **environment(device, torch.float32, args.threads),
            "repeats": args.repeats,
            "summary": summary,
            "results": results,
            "two_jobs": two_jobs,
            "two_jobs_steps": {"clip": args.job_steps, "stage3": stage3_job_steps},
            "phases": phases,
            "profiles": profiles,
        }
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

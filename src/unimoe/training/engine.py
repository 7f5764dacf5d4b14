"""Distribution backends behind one small interface: one process, DDP, FSDP2 and DeepSpeed ZeRO.

``accelerate`` sets up processes and devices, wraps DDP and runs mixed precision for the one-process
and DDP cases. Two backends bypass it on purpose, because on CPU (``gloo``) it does not deliver them:
its FSDP plugin silently falls back to DDP on a CPU-only machine, and its DeepSpeed integration reports
one process per rank when there is no GPU. FSDP2 therefore applies ``torch.distributed.fsdp.fully_shard``
to every decoder layer and then to the root; DeepSpeed runs through ``deepspeed.initialize`` with the
user's JSON. The same code then runs on a laptop, under ``torchrun`` on CPU, and on GPUs.

Every backend averages gradients over processes and does not rescale for accumulation: the loop
passes per-micro-batch losses already normalised by the global number of target tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .optim import clip_gradients
from .recipe import RecipeError

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
_STATE_OPTIONS = dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def resolve_backend(distributed: str, deepspeed_config: str | None) -> str:
    """The backend to use: ``none``, ``ddp``, ``fsdp2`` or ``deepspeed`` (``auto``: DeepSpeed when a
    config is given, DDP under a multi-process launcher, else one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed == "auto":
        return "deepspeed" if deepspeed_config else ("ddp" if world > 1 else "none")
    if distributed == "none" and world > 1:
        raise RecipeError(f"train.distributed=none, but {world} processes were launched (use ddp or fsdp2)")
    return distributed


def resolve_precision(precision: str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` (``auto``: bf16 on a GPU that has it, fp32 otherwise)."""
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_deepspeed_config(
    path: str, batch_size: int, grad_accum: int, world: int, clip: float | None, precision: str, hidden: int
) -> dict:
    """The user's DeepSpeed JSON with ``"auto"`` values filled in from the recipe (batch sizes,
    accumulation, clipping, precision) and from the model width (ZeRO bucket sizes, as transformers
    fills them)."""
    config = json.loads(Path(path).read_text())
    filled = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": batch_size * grad_accum * world,
        "gradient_clipping": clip or 0.0,
    }
    for key, value in filled.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    for key, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = config.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = enabled
    zero = config.setdefault("zero_optimization", {})
    buckets = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in buckets.items():
        if zero.get(key) == "auto":
            zero[key] = value
    config.setdefault("zero_allow_untested_optimizer", True)
    unresolved = [k for k, v in config.items() if v == "auto"]
    if unresolved:
        raise RecipeError(f"{path}: cannot fill 'auto' for {unresolved}")
    return config


class Engine:
    """Forward, backward, optimizer step and checkpoint state of one training module under a backend."""

    def __init__(self, backend: str, precision: str, deepspeed_config: str | None = None):
        self.backend = backend
        self.precision = resolve_precision(precision)
        self.deepspeed_config = deepspeed_config
        self.accelerator = None
        if backend == "deepspeed":
            import deepspeed

            if int(os.environ.get("WORLD_SIZE", "1")) > 1 or not dist.is_initialized():
                deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        else:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs

            mixed = {"fp32": "no"}.get(self.precision, self.precision)
            self.accelerator = Accelerator(
                cpu=not torch.cuda.is_available(),
                mixed_precision="no" if backend == "fsdp2" else mixed,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
            )
            self.rank, self.world_size = self.accelerator.process_index, self.accelerator.num_processes
            self.device = self.accelerator.device
        if self.precision == "fp16" and backend != "deepspeed":
            raise RecipeError("train.precision=fp16 needs a loss scaler: use bf16, or fp16 through DeepSpeed")
        if backend in ("ddp", "fsdp2") and self.world_size < 2:
            raise RecipeError(f"train.distributed={backend} needs several processes (launch with torchrun)")
        self.is_main = self.rank == 0
        self.module: nn.Module | None = None
        self.wrapped: nn.Module | None = None
        self.optimizer = None
        self.scheduler = None
        self.max_grad_norm: float | None = None

    # setup -------------------------------------------------------------------------------------

    def setup(
        self,
        module: nn.Module,
        build_optimizer: OptimizerFactory,
        build_scheduler: SchedulerFactory,
        layers: list[nn.Module],
        batch_size: int,
        grad_accum: int,
        max_grad_norm: float | None,
        hidden_size: int,
    ) -> None:
        """Places and wraps ``module`` (``layers``: its decoder layers, the FSDP2 units) and builds the
        optimizer over its trainable parameters and the scheduler. ``hidden_size`` sizes DeepSpeed's
        ``auto`` buckets."""
        self.module = module
        self.max_grad_norm = max_grad_norm
        module.to(self.device)
        if self.backend == "deepspeed":
            self._setup_deepspeed(
                module, build_optimizer, build_scheduler, batch_size, grad_accum, hidden_size
            )
            return
        if self.backend == "fsdp2":
            self._shard(module, layers)
            self.wrapped = module
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params)
        self.scheduler = build_scheduler(self.optimizer)
        if self.backend != "fsdp2":
            self.wrapped = self.accelerator.prepare_model(module)

    def _shard(self, module: nn.Module, layers: list[nn.Module]) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy()
        if self.precision in ("bf16", "fp16"):
            low = torch.bfloat16 if self.precision == "bf16" else torch.float16
            policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)

    def _setup_deepspeed(
        self, module, build_optimizer, build_scheduler, batch_size, grad_accum, hidden: int
    ) -> None:
        import deepspeed

        config = load_deepspeed_config(
            self.deepspeed_config,
            batch_size,
            grad_accum,
            self.world_size,
            self.max_grad_norm,
            self.precision,
            hidden,
        )
        optimizer = None
        scheduler = None
        if "optimizer" not in config:
            optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad])
            scheduler = build_scheduler(optimizer)
        engine, optimizer, _, ds_scheduler = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            model_parameters=[p for p in module.parameters() if p.requires_grad],
            lr_scheduler=scheduler,
            config=config,
        )
        self.wrapped, self.optimizer = engine, optimizer
        self.scheduler = ds_scheduler or scheduler

    # the step ----------------------------------------------------------------------------------

    def forward(self, **inputs):
        """The wrapped module's forward (under autocast where the backend uses it)."""
        context = self.accelerator.autocast() if self.accelerator is not None else nullcontext()
        with context:
            return self.wrapped(**inputs)

    def sync_context(self, sync: bool):
        """Context for a backward pass: gradient reduction only when ``sync`` (the last micro-batch)."""
        if self.backend == "fsdp2":
            self.wrapped.set_requires_gradient_sync(sync)
            return nullcontext()
        if self.backend == "ddp" and not sync:
            return self.accelerator.no_sync(self.wrapped)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates the gradients of ``loss`` (already scaled for accumulation and processes)."""
        if self.backend == "deepspeed":
            self.wrapped.backward(loss, scale_wrt_gas=False)
            self.wrapped.step()  # DeepSpeed only steps at accumulation boundaries
        else:
            self.accelerator.backward(loss)

    def step(self) -> float | None:
        """Clips, steps optimizer and scheduler, zeroes gradients; returns the gradient norm."""
        if self.backend == "deepspeed":
            norm = self.wrapped.get_global_grad_norm()
            return None if norm is None else float(norm)
        norm = None
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.max_grad_norm:
            total = clip_gradients(params, self.max_grad_norm)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        """The current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    # collectives -------------------------------------------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes (identity with one process)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        """Waits for every process."""
        if self.world_size > 1:
            dist.barrier()

    # state -------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Writes trainable weights, optimizer and scheduler state under ``directory`` (all processes
        call it; what each writes depends on the backend)."""
        if self.backend == "deepspeed":
            self.wrapped.save_checkpoint(str(directory), tag="deepspeed", exclude_frozen_parameters=True)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(
            self.module, self.optimizer, options=StateDictOptions(**_STATE_OPTIONS)
        )
        if self.is_main:
            torch.save(model_state, directory / "trainable.pt")
            torch.save(optim_state, directory / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, directory: Path) -> None:
        """Restores what ``save`` wrote."""
        if self.backend == "deepspeed":
            self.wrapped.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_state = torch.load(directory / "trainable.pt", map_location="cpu", weights_only=True)
        optim_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False)
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))

    @property
    def sharded(self) -> bool:
        """Whether parameters are split across processes (FSDP2, ZeRO-3)."""
        if self.backend == "fsdp2":
            return True
        return self.backend == "deepspeed" and self.wrapped.zero_optimization_stage() == 3

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every weight of the module, gathered on the main process (None elsewhere)."""
        if self.backend == "deepspeed" and self.sharded:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
            return state if self.is_main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.module, options=options)
        return state if self.is_main else None

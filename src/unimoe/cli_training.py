"""``unimoe train``, ``unimoe upcycle`` and ``unimoe data check``.

::

    unimoe train RECIPE.yaml [key=value ...]        # e.g. train.max_steps=5 data.train=/x.json
    torchrun --nproc_per_node=2 -m unimoe.cli train RECIPE.yaml train.distributed=fsdp2
    unimoe upcycle --base STAGE1/final --experts a.safetensors b.safetensors ... --out DIR \\
        [--connectors c.safetensors ...] [--router topk_softmax] [--top-k 2] [--moe-layers all] \\
        [--expert-lora-rank 0]
    unimoe data check FILE [--media-root DIR] [--model DIR] [--no-decode]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import EXIT_CONFIG_ERROR, EXIT_INPUT_ERROR, UniMoeConfigError, UniMoeInputError


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_command(args: argparse.Namespace) -> int:
    """Runs a parsed command. A configuration error exits with 2 and unusable input data with 3, the
    message logged; other failures propagate (exit 1 with a traceback)."""
    try:
        return int(args.func(args) or 0)
    except UniMoeConfigError as err:
        logging.getLogger("unimoe").error("configuration: %s", err)
        return EXIT_CONFIG_ERROR
    except UniMoeInputError as err:
        logging.getLogger("unimoe").error("input data: %s", err)
        return EXIT_INPUT_ERROR


def _run_train(args: argparse.Namespace) -> int:
    from .training import train

    _setup_logging()
    result = train(args.recipe, args.overrides)
    if int(os.environ.get("RANK", "0")) == 0:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        sys.stdout.write(
            f"{result.steps} steps, final loss {last}, {result.skipped} skipped sample(s), "
            f"{result.wall_seconds:.1f} s; outputs in {result.final_dir or result.output_dir}\n"
        )
    return 0


def _moe_layers(text: str) -> str | list[int]:
    if text in ("all", "even", "odd", "none"):
        return text
    try:
        return [int(x) for x in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--moe-layers: all, even, odd, none or a comma list, got {text!r}"
        ) from err


def _run_upcycle(args: argparse.Namespace) -> int:
    from .training import upcycle

    _setup_logging()
    out = upcycle(
        args.base,
        args.experts,
        args.out,
        connectors=args.connectors,
        connector_merge=args.connector_merge,
        router=args.router,
        top_k=args.top_k,
        moe_layers=args.moe_layers,
        expert_lora_rank=args.expert_lora_rank,
        expert_lora_alpha=args.expert_lora_alpha,
        expert_lora_dropout=args.expert_lora_dropout,
    )
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _run_data_check(args: argparse.Namespace) -> int:
    from .data.check import check_data

    processor = None
    if args.model:
        from .processing.processor import UniMoeProcessor

        processor = UniMoeProcessor.from_pretrained(args.model)
    report = check_data(
        args.file,
        args.media_root,
        processor=processor,
        voice_modality=args.voice_modality,
        decode=not args.no_decode,
        limit=args.limit,
    )
    sys.stdout.write(report.format() + "\n")
    return 0 if report.ok else 1


def add_data_check_command(data_subparsers) -> argparse.ArgumentParser:
    """Registers ``check`` under the ``data`` command's subparsers."""
    p = data_subparsers.add_parser("check", help="report bad records and media in a training file")
    p.add_argument("file", help="training data: a JSON list or JSONL file of records")
    p.add_argument(
        "--media-root", default=None, help="folder media paths are relative to (default: the file's)"
    )
    p.add_argument("--model", default=None, help="a model folder whose processor also encodes each record")
    p.add_argument("--voice-modality", default="speech", choices=["speech", "audio"])
    p.add_argument("--no-decode", action="store_true", help="only check that media files exist")
    p.add_argument("--limit", type=int, default=5, help="offenders listed per kind of problem")
    p.set_defaults(func=_run_data_check)
    return p


def add_training_commands(subparsers, data_subparsers=None):
    """Registers ``train``, ``upcycle`` and ``data check``. Creates the ``data`` command unless its
    subparsers are passed in; returns the ``data`` subparsers so that more can be added."""
    p = subparsers.add_parser("train", help="run a training recipe (stage 1, 2 or 3)")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=5")
    p.set_defaults(func=_run_train)

    p = subparsers.add_parser("upcycle", help="dense stage-1 model + stage-2 expert FFNs -> MoE checkpoint")
    p.add_argument("--base", required=True, help="the dense multimodal model (stage-1 final folder)")
    p.add_argument("--experts", nargs="+", required=True, help="stage-2 FFN files, one per expert slot")
    p.add_argument("--connectors", nargs="*", default=[], help="stage-2 connector files")
    p.add_argument("--connector-merge", default="average", choices=["average", "first"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--router", default="topk_softmax", choices=["topk_softmax", "softmax_topk"])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-layers", type=_moe_layers, default="all")
    p.add_argument("--expert-lora-rank", type=int, default=0)
    p.add_argument("--expert-lora-alpha", type=float, default=16.0)
    p.add_argument("--expert-lora-dropout", type=float, default=0.05)
    p.set_defaults(func=_run_upcycle)

    if data_subparsers is None:
        data = subparsers.add_parser("data", help="training-data tools")
        data_subparsers = data.add_subparsers(dest="data_command", required=True)
    add_data_check_command(data_subparsers)
    return data_subparsers


def main(argv: list[str] | None = None) -> int:
    """These commands alone (``python -m unimoe.cli_training ...``), e.g. under ``torchrun``."""
    parser = argparse.ArgumentParser(prog="unimoe", description="Uni-MoE training commands")
    add_training_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

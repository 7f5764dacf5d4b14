"""The ``unimoe`` command: one entry point, a subcommand per job.

``unimoe demo | ablate | convert | train | upcycle | data {synth,check} | chat | generate | serve | eval | web``; each subcommand is a
thin adapter over a package function.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .cli_inference import add_eval_command, add_inference_commands, add_web_command
from .cli_training import add_training_commands, run_command


def _run_synth(args: argparse.Namespace) -> int:
    from .demo.synth import synthesize

    tasks = args.tasks.split(",") if args.tasks else None
    summary = synthesize(
        args.out_dir,
        seed=args.seed,
        n_train=args.n_train,
        n_heldout=args.n_heldout,
        image_size=args.image_size,
        tasks=tasks,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _add_synth_command(data_subparsers) -> None:
    p = data_subparsers.add_parser("synth", help="write the synthetic multimodal instruction set")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=240, help="training records per task")
    p.add_argument("--n-heldout", type=int, default=40, help="held-out records per task")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--tasks", default="", help="comma-separated subset of tasks")
    p.set_defaults(func=_run_synth)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(out_dir=args.out_dir, seed=args.seed, quick=args.quick)
    if args.n_heldout is not None:
        settings.n_heldout = args.n_heldout
    run_demo(settings)
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    import torch

    from .release import convert_release

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    dtype = None if args.dtype == "stored" else getattr(torch, args.dtype)
    convert_release(
        args.base,
        args.e2,
        experts=args.experts,
        clip=args.clip,
        whisper=args.whisper,
        beats=args.beats,
        out=args.out,
        dtype=dtype,
        merge_expert_lora=args.merge_expert_lora,
    )
    print(f"wrote {args.out}")
    return 0


def _add_convert_command(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="released Uni-MoE checkpoint directories -> one standard model directory"
    )
    p.add_argument("--base", required=True, help="the release's *-base directory")
    p.add_argument("--e2", required=True, help="the release's *-e2 (stage 3) directory")
    p.add_argument("--experts", help="8-expert model only: the stage-2 expert FFNs (Uni_MoE_8e_Experts)")
    p.add_argument("--clip", required=True, help="CLIP ViT-L/14-336 in transformers format")
    branch = p.add_mutually_exclusive_group(required=True)
    branch.add_argument("--whisper", help="Whisper-small in transformers format (speech variant)")
    branch.add_argument("--beats", help="the official BEATs checkpoint file (audio variant)")
    p.add_argument("--out", required=True, help="a new directory for the converted model")
    p.add_argument("--dtype", default="stored", choices=["stored", "float32", "bfloat16", "float16"])
    p.add_argument(
        "--merge-expert-lora",
        action="store_true",
        help="8-expert model: fold the in-expert LoRA into the experts (default: keep it as adapters)",
    )
    p.set_defaults(func=_run_convert)


def _add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a small Uni-MoE through all three stages on synthetic data")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    p.add_argument(
        "--n-heldout",
        type=int,
        default=None,
        help="held-out records per task (default 40): more make a more precise table; training is the same",
    )
    p.set_defaults(func=_run_demo)


def _run_ablate(args: argparse.Namespace) -> int:
    from .ablation import AblationSettings, run_ablation

    settings = AblationSettings(
        out_dir=args.out_dir,
        quick=args.quick,
        data_dir=args.data,
        base=args.base,
        **({"seeds": args.seeds} if args.seeds else {}),
        **({"variants": args.variants.split(",")} if args.variants else {}),
        **({"variants_dir": args.variants_dir} if args.variants_dir else {}),
    )
    report = run_ablation(settings)
    print((Path(args.out_dir) / "report.md").read_text())
    print(json.dumps({k: v["verdict"] for k, v in report["claims"].items()}))
    return 0


def _add_ablate_command(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate", help="dense vs generic MoE vs Uni-MoE on a harder synthetic suite, over seeds"
    )
    p.add_argument("--out-dir", default="runs/ablation")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2")
    p.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--variants-dir", help="a folder of variant files (default: the shipped ones)")
    p.add_argument("--data", help="a folder with train.json and heldout.json (default: the synthetic suite)")
    p.add_argument("--base", help="a dense model with pre-trained encoders (default: stage 0 of the demo)")
    p.add_argument("--quick", action="store_true", help="one seed, a few steps per stage (for tests)")
    p.set_defaults(func=_run_ablate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="unimoe", description="Uni-MoE: unified multimodal MoE LLM")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_command(subparsers)
    _add_ablate_command(subparsers)
    _add_convert_command(subparsers)
    data_subparsers = add_training_commands(subparsers)
    _add_synth_command(data_subparsers)
    add_inference_commands(subparsers)
    add_eval_command(subparsers)
    add_web_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``unimoe`` with ``argv`` (default: the process arguments)."""
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

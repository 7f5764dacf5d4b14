"""The ``unimoe`` command: one entry point, a subcommand per job.

``unimoe demo | train | upcycle | data {synth,check} | chat | generate | serve``; each subcommand is a
thin adapter over a package function.
"""

from __future__ import annotations

import argparse
import json
import sys

from .cli_inference import add_inference_commands
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
    run_demo(settings)
    return 0


def _add_demo_command(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train a small Uni-MoE through all three stages on synthetic data")
    p.add_argument("--out-dir", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    p.set_defaults(func=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="unimoe", description="Uni-MoE: unified multimodal MoE LLM")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo_command(subparsers)
    data_subparsers = add_training_commands(subparsers)
    _add_synth_command(data_subparsers)
    add_inference_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``unimoe`` with ``argv`` (default: the process arguments)."""
    args = build_parser().parse_args(argv)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())

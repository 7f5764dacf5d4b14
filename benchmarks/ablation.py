"""The ablation (``unimoe ablate``) as a benchmark script: dense vs generic MoE vs Uni-MoE.

    python benchmarks/ablation.py [--quick] [--out-dir runs/ablation] [--seeds 0 1 2] [--variants a,b]

Prints the report's tables and writes ``report.json`` (its ``summary``: mean accuracy per variant,
each variant's accuracy difference from dense, the claims' verdicts), ``report.md`` and the figures
under ``--out-dir``.
Run it alone: two threads, nothing else heavy on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from unimoe.ablation import AblationSettings, run_ablation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/ablation")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--variants", default="")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = AblationSettings(
        out_dir=args.out_dir,
        quick=args.quick,
        **({"seeds": args.seeds} if args.seeds else {}),
        **({"variants": args.variants.split(",")} if args.variants else {}),
    )
    report = run_ablation(settings)
    print((Path(args.out_dir) / "report.md").read_text())
    print(json.dumps(report["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

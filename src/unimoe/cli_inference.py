"""The inference subcommands of ``unimoe``: ``chat``, ``generate`` and ``serve``.

Each works with ``--model tiny`` (a random tiny model, no weights) or a model directory holding the
model and processor files.
"""

from __future__ import annotations

import argparse
import sys


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="model directory, or 'tiny' (default: tiny)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 (or float16) on GPU, float32 on CPU",
    )


def _add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _params(args: argparse.Namespace):
    from .inference.engine import GenerationParams

    return GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def _engine(args: argparse.Namespace):
    from .inference.engine import UniMoeEngine

    return UniMoeEngine.load(args.model, device=args.device, dtype=args.dtype)


def run_chat(args: argparse.Namespace) -> int:
    """``unimoe chat``."""
    from .inference.chat import chat_loop

    engine = _engine(args)
    if sys.stdin.isatty():
        print(f"Uni-MoE chat ({engine.name}). /help lists the commands.")
    chat_loop(engine, _params(args), system=args.system)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    """``unimoe generate``."""
    from .inference.batch import run_batch

    engine = _engine(args)
    summary = run_batch(
        engine,
        args.input,
        args.output,
        _params(args),
        batch_size=args.batch_size,
        media_root=args.media_root,
        progress=not args.no_progress,
    )
    print(
        f"{summary.answered} answered, {summary.failed} failed, {summary.skipped} already done "
        f"-> {args.output}",
        file=sys.stderr,
    )
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``unimoe serve``."""
    from .inference.server import ServerConfig, serve

    config = ServerConfig(
        host=args.host,
        port=args.port,
        media_root=args.media_root,
        allow_remote_media=args.allow_remote_media,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
        max_request_bytes=args.max_request_bytes,
        timeout=args.timeout,
        batch_window_ms=args.batch_window_ms,
        default_max_tokens=args.default_max_tokens,
        batching=args.batching,
        max_batch_tokens=args.max_batch_tokens,
        worker_threads=args.worker_threads,
    )
    serve(_engine(args), config)
    return 0


def add_inference_commands(subparsers) -> None:
    """Registers ``chat``, ``generate`` and ``serve`` on an ``argparse`` subparsers object; each
    parser's ``func`` runs the command and returns the exit status."""
    chat = subparsers.add_parser("chat", help="interactive chat in the terminal")
    _add_model_args(chat)
    _add_sampling_args(chat, 256)
    chat.add_argument("--system", default=None, help="system prompt (default: the model's)")
    chat.set_defaults(func=run_chat)

    gen = subparsers.add_parser("generate", help="answer every record of a JSONL file (resumable)")
    _add_model_args(gen)
    _add_sampling_args(gen, 256)
    gen.add_argument("--input", required=True, help="JSONL of release records or {'id', 'messages'}")
    gen.add_argument("--output", required=True, help="JSONL answers, appended; existing ids are skipped")
    gen.add_argument("--media-root", default=None, help="folder that relative media paths are under")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen.set_defaults(func=run_generate)

    srv = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, local only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--media-root", default=None, help="folder that requests may read local media from")
    srv.add_argument("--allow-remote-media", action="store_true", help="let requests fetch http(s) media")
    srv.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together")
    srv.add_argument(
        "--batching",
        default="continuous",
        choices=["continuous", "static"],
        help="continuous: requests join and leave the batch at every step; static: whole batches",
    )
    srv.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="continuous: cached tokens per batch"
    )
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    srv.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds per request before 504")
    srv.add_argument(
        "--batch-window-ms", type=float, default=5.0, help="static: wait for more requests per batch"
    )
    srv.add_argument("--default-max-tokens", type=int, default=512, help="when a request sets none")
    srv.set_defaults(func=run_serve)


def run_eval(args: argparse.Namespace) -> int:
    """``unimoe eval``: run and score a benchmark, score predictions (``--score-only``), or report."""
    import json
    import logging
    from pathlib import Path

    from .errors import UniMoeConfigError
    from .evaluation.report import report
    from .evaluation.runner import EvalSettings, run_eval, score_only

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.report:
        sys.stdout.write(report([Path(p) for p in args.report], args.variant))
        return 0
    if not args.benchmark or not args.data:
        raise UniMoeConfigError("unimoe eval needs --benchmark and --data (or --report DIR)")
    judge = {"url": args.judge_url, "model": args.judge_model, "prompt_file": args.judge_prompt}
    settings = EvalSettings(
        benchmark=args.benchmark,
        data=Path(args.data),
        out=Path(args.out) if args.out else None,
        media_root=Path(args.media_root) if args.media_root else None,
        annotations=Path(args.annotations) if args.annotations else None,
        data_format=args.format,
        rule=args.rule,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        prompt_suffix=args.prompt_suffix,
        limit=args.limit,
        circular=not args.no_circular,
        judge={k: v for k, v in judge.items() if v},
    )
    if args.score_only:
        if not args.predictions:
            raise UniMoeConfigError("--score-only needs --predictions FILE")
        scores = score_only(settings, Path(args.predictions), args.id_field, args.answer_field)
    else:
        scores = run_eval(_engine(args), settings, progress=not args.no_progress)
    summary = {k: scores[k] for k in ("benchmark", "rule", "official", "metrics", "n", "errors", "missing")}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def run_web(args: argparse.Namespace) -> int:
    """``unimoe web``."""
    from pathlib import Path

    from .inference.web import WebSettings, serve_web

    settings = WebSettings(
        host=args.host,
        port=args.port,
        max_upload_mb=args.max_upload_mb,
        max_batch_size=args.max_batch_size,
        examples=Path(args.examples) if args.examples else None,
        media_root=Path(args.media_root) if args.media_root else None,
    )
    serve_web(_engine(args), settings)
    return 0


def add_web_command(subparsers) -> None:
    """Registers ``web``."""
    web = subparsers.add_parser("web", help="a chat page in the browser (Gradio; pip install unimoe[web])")
    _add_model_args(web)
    web.add_argument(
        "--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; 0.0.0.0 exposes it)"
    )
    web.add_argument("--port", type=int, default=7860)
    web.add_argument("--examples", help="release-format records whose media become one-click examples")
    web.add_argument("--media-root", help="folder the examples' media paths are under (default: theirs)")
    web.add_argument("--max-upload-mb", type=float, default=25.0)
    web.add_argument("--max-batch-size", type=int, default=8)
    web.set_defaults(func=run_web)


def add_eval_command(subparsers) -> None:
    """Registers ``eval``."""
    from .evaluation.benchmarks import BENCHMARKS
    from .evaluation.formats import LOADERS
    from .evaluation.report import PAPER

    ev = subparsers.add_parser(
        "eval", help="evaluate on a benchmark with its official metric (batched, resumable), or score/report"
    )
    _add_model_args(ev)
    ev.add_argument("--benchmark", choices=sorted(BENCHMARKS))
    ev.add_argument("--data", help="the benchmark file (release eval JSON or the official format)")
    ev.add_argument("--annotations", help="VQAv2 / OK-VQA: the annotations JSON beside the questions")
    ev.add_argument("--format", choices=sorted(LOADERS), help="the data file's format (default: detected)")
    ev.add_argument("--media-root", help="folder that relative media paths are under")
    ev.add_argument("--out", help="folder for predictions.jsonl and scores.json (a rerun resumes)")
    ev.add_argument("--rule", help="a scoring rule other than the official one (see the README)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the release's per benchmark")
    ev.add_argument("--temperature", type=float, default=None, help="default: the release's per benchmark")
    ev.add_argument("--top-p", type=float, default=1.0)
    ev.add_argument("--seed", type=int, default=0, help="sampled answers: a seed per item derived from it")
    ev.add_argument("--prompt-suffix", default=None, help="replaces the answer-format sentence ('' drops it)")
    ev.add_argument("--limit", type=int, default=None, help="only the first N items")
    ev.add_argument("--no-circular", action="store_true", help="MMBench: no option rotations")
    ev.add_argument("--judge-url", help="OpenAI-compatible base URL (…/v1) of a judge model")
    ev.add_argument("--judge-model", help="the judge's model name")
    ev.add_argument(
        "--judge-prompt", help="a file with the judge instructions ({question} {answer} {prediction})"
    )
    ev.add_argument("--predictions", help="with --score-only: predictions made elsewhere")
    ev.add_argument("--score-only", action="store_true", help="score --predictions; generate nothing")
    ev.add_argument("--id-field", default=None, help="id field of --predictions (default: question_id or id)")
    ev.add_argument("--answer-field", default=None, help="answer field of --predictions (default: text)")
    ev.add_argument("--report", nargs="+", metavar="DIR", help="Markdown table of scores.json under DIR(s)")
    ev.add_argument("--variant", default="4e", choices=sorted(PAPER), help="--report: the paper's row")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=run_eval)

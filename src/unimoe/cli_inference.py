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
    srv.add_argument("--max-batch-size", type=int, default=8)
    srv.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    srv.add_argument("--max-request-bytes", type=int, default=32 * 1024 * 1024)
    srv.add_argument("--timeout", type=float, default=300.0, help="seconds per request before 504")
    srv.add_argument("--batch-window-ms", type=float, default=5.0, help="wait for more requests per batch")
    srv.add_argument("--default-max-tokens", type=int, default=512, help="when a request sets none")
    srv.set_defaults(func=run_serve)

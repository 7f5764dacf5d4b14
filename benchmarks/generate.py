"""Generation speed for multimodal prompts: the engine (KV cache, batched) against the release's way.

Every prompt holds an image, a speech clip, an audio clip and text (texts of different lengths, so
that batches are left-padded). Methods, all greedy on the same random weights, each producing
exactly ``--new-tokens`` tokens per prompt (end-of-sequence is ignored):

- ``release``: the release's decoding, batch 1 without a KV cache: every step runs the full model
  forward on the whole growing sequence, media included, so the encoders run again at every step.
  (The release also encodes a dummy image and 8 dummy video frames per sample; that is left out, so
  this baseline is faster than the release.)
- ``engine b1`` / ``engine b8``: ``UniMoeEngine.generate_encoded`` at batch 1 and 8 (KV cache, media
  encoded once in the prefill).

Prompts are encoded once, untimed: the processor's work is the same for every method. Reported per
method: generated tokens per second over the batch, and time to first token (a 1-token generation of
the same batch). Each round times every method once in a rotating order; medians over ``--repeats``
rounds are reported. The tiny preset and a mid-size CPU shape (text hidden 512, 4 layers, 4 experts;
CLIP hidden 256, 4 layers, 64 px images) are measured.

Run: ``python benchmarks/generate.py [--quick] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from common import (
    Case,
    environment,
    format_table,
    interleaved_medians,
    select_device,
    select_dtype,
    write_json,
)

from unimoe.inference import GenerationParams, UniMoeEngine
from unimoe.modalities import media_input_keys
from unimoe.modeling.configuration_unimoe import UniMoeConfig
from unimoe.modeling.modeling_unimoe import UniMoeForConditionalGeneration
from unimoe.presets import tiny
from unimoe.processing.processor import EncodedSample, UniMoeProcessor

RESULT_KEYS = ("shape", "method", "batch", "new_tokens", "ms", "tokens_per_s", "ttft_ms", "speedup")


def mid_config() -> UniMoeConfig:
    """A mid-size CPU shape: text hidden 512 / 4 layers / 4 experts, CLIP hidden 256 / 4 layers at 64 px."""
    config = tiny(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8
    ).to_dict()
    config["vision_config"].update(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=64
    )
    config["speech_config"].update(
        d_model=128, encoder_ffn_dim=512, encoder_layers=2, encoder_attention_heads=4
    )
    return UniMoeConfig.from_dict(config)


SHAPES: dict[str, Callable[[], UniMoeConfig]] = {"tiny": tiny, "mid": mid_config}


def build_engine(config: UniMoeConfig, device: torch.device, dtype: torch.dtype) -> UniMoeEngine:
    """A random-weight engine for ``config``."""
    torch.manual_seed(0)
    model = UniMoeForConditionalGeneration(config).eval().to(device, dtype)
    return UniMoeEngine(model, UniMoeProcessor.for_config(config), name="bench")


def prompts(count: int, seed: int = 0) -> list[list[dict]]:
    """``count`` chat prompts, each with an image, speech, audio and a text of its own length."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = rng.integers(0, 256, (72, 96, 3), dtype=np.uint8)
        speech = (rng.standard_normal(int(16000 * 1.5)).astype(np.float32) * 0.1, 16000)
        audio = (rng.standard_normal(16000 * 2).astype(np.float32) * 0.1, 16000)
        text = "Describe the picture, the voice and the sound. " * (1 + i % 4)
        content = [
            {"type": "image", "image": image},
            {"type": "speech", "speech": speech},
            {"type": "audio", "audio": audio},
            {"type": "text", "text": text},
        ]
        out.append([{"role": "user", "content": content}])
    return out


@torch.inference_mode()
def release_generate(
    engine: UniMoeEngine, sample: EncodedSample, new_tokens: int, stop_at_eos: bool = False
) -> list[int]:
    """Greedy decoding the release's way: no KV cache, full forward with the media at every step.
    Exactly ``new_tokens`` tokens (end-of-sequence masked), or with ``stop_at_eos`` up to the first
    end-of-sequence (not returned)."""
    batch = engine.processor.collate([sample], padding_side="left")
    media = {k: batch[k].to(engine.device) for k in media_input_keys() if k in batch}
    ids = batch["input_ids"].to(engine.device)  # [1, S]
    eos = engine.processor.tokenizer.eos_token_id
    start = ids.shape[1]
    for _ in range(new_tokens):
        logits = engine.model(input_ids=ids, use_cache=False, logits_to_keep=1, **media).logits[:, -1]
        if not stop_at_eos:
            logits[:, eos] = float("-inf")  # as ignore_eos: exactly new_tokens tokens
        token = logits.argmax(dim=-1, keepdim=True)
        if stop_at_eos and token.item() == eos:
            break
        ids = torch.cat([ids, token], dim=1)  # [1, S + 1]
    return ids[0, start:].tolist()


def check_methods_agree(engine: UniMoeEngine, samples: list[EncodedSample], new_tokens: int) -> None:
    """The release-way decoding and the engine give the same greedy tokens (prefix checked: float
    differences between cached and uncached attention may flip a near-tie late in a random model)."""
    params = GenerationParams(max_new_tokens=new_tokens, ignore_eos=True)
    ours = engine.generate_encoded(samples[:1], params)[0].token_ids
    theirs = release_generate(engine, samples[0], new_tokens)
    agree = min(4, new_tokens)
    if ours[:agree] != theirs[:agree]:
        raise AssertionError(f"engine and release-way decoding differ: {ours[:agree]} vs {theirs[:agree]}")


def cases(engine: UniMoeEngine, samples: list[EncodedSample], new_tokens: int, batch: int) -> list[Case]:
    """Timed workloads: generation and time to first token, per method."""

    def engine_run(rows: list[EncodedSample], tokens: int) -> Callable[[], object]:
        params = GenerationParams(max_new_tokens=tokens, ignore_eos=True)
        return lambda: engine.generate_encoded(rows, params)

    return [
        Case("release", lambda: release_generate(engine, samples[0], new_tokens)),
        Case("release ttft", lambda: release_generate(engine, samples[0], 1)),
        Case("engine b1", engine_run(samples[:1], new_tokens)),
        Case("engine b1 ttft", engine_run(samples[:1], 1)),
        Case(f"engine b{batch}", engine_run(samples[:batch], new_tokens)),
        Case(f"engine b{batch} ttft", engine_run(samples[:batch], 1)),
    ]


def measure(shape: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Result rows for one model shape."""
    engine = build_engine(SHAPES[shape](), device, dtype)
    samples = [engine.encode(p) for p in prompts(args.batch_size)]
    check_methods_agree(engine, samples, args.new_tokens)
    times = interleaved_medians(
        cases(engine, samples, args.new_tokens, args.batch_size), args.repeats, 1, device
    )
    rows = []
    for method, batch in (("release", 1), ("engine b1", 1), (f"engine b{args.batch_size}", args.batch_size)):
        ms = times[method]
        rows.append(
            {
                "shape": shape,
                "method": method,
                "batch": batch,
                "new_tokens": args.new_tokens,
                "ms": ms,
                "tokens_per_s": batch * args.new_tokens / (ms / 1e3),
                "ttft_ms": times[f"{method} ttft"],
            }
        )
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny shape only, 8 new tokens, batch 4, 1 round"
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.new_tokens, args.batch_size, args.repeats = ["tiny"], 8, 4, 1
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    results: list[dict[str, Any]] = []
    for shape in args.shapes:
        results.extend(measure(shape, args, device, dtype))
    headers = ["shape", "method", "batch", "tokens", "ms", "tok/s", "TTFT ms", "x release"]
    table = [[r[k] for k in RESULT_KEYS] for r in results]
    print(format_table(headers, table))
    if args.json:
        payload = {**environment(device, dtype, torch.get_num_threads()), "results": results}
        write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())

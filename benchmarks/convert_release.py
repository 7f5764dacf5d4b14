"""Peak memory of converting a released checkpoint, next to the checkpoint's size.

Writes a synthetic checkpoint in the release's v1 speech layout whose language-model layers have the
full LLaMA-7B shape (hidden 4096, FFN 11008, 4 experts per layer; ``--layers`` of them, vocabulary
32000, fp16), one base shard per layer plus one for the embeddings, head and connectors, and an e2
directory (PEFT adapter, non-LoRA trainables, aligner, routers). Encoders and connectors are tiny:
they come from their own small files and do not change what is measured. Then ``unimoe convert``'s
``write_release_directory`` runs in a fresh process, whose peak resident memory (``VmHWM``) less its
peak after imports is the conversion's peak.

The target (issue: "peak memory at most the checkpoint size plus one shard"): the summary's
``peak_over_checkpoint_plus_shard`` at most 1.

Run: ``python benchmarks/convert_release.py [--quick] [--layers N] [--json results.json]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import format_table, write_json

SHAPES = {
    "llama-7b": dict(hidden=4096, ffn=11008, vocab=32000, heads=32),
    "quick": dict(hidden=256, ffn=688, vocab=512, heads=4),
}
EXPERTS = 4


def _tensor(*shape: int) -> torch.Tensor:
    return torch.full(shape, 0.01, dtype=torch.float16)


def write_checkpoint(root: Path, shape: dict, layers: int) -> tuple[Path, Path, Path, Path, int, int]:
    """The release directories and tiny encoder directories; returns them, total and largest shard bytes."""
    from transformers import AutoTokenizer, CLIPVisionModel, WhisperModel

    from unimoe.presets import tiny
    from unimoe.processing.processor import TINY_TOKENIZER

    h, f, v = shape["hidden"], shape["ffn"], shape["vocab"]
    base, e2 = root / "base", root / "e2"
    base.mkdir()
    e2.mkdir()
    small = tiny()  # the tiny preset's CLIP and Whisper, with Whisper's released 30 s window
    CLIPVisionModel(small.vision_config).save_pretrained(root / "clip")
    whisper_config = small.speech_config
    whisper_config.max_source_positions = 1500
    whisper = WhisperModel(whisper_config)
    whisper.save_pretrained(root / "whisper")
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER), tokenizer_class="LlamaTokenizer")
    tokenizer.save_pretrained(base)

    shards: dict[str, dict[str, torch.Tensor]] = {}
    top = {
        "model.embed_tokens.weight": _tensor(v, h),
        "lm_head.weight": _tensor(v, h),
        "model.norm.weight": _tensor(h),
    }
    top.update({"model.mm_projector.0.weight": _tensor(h, 32), "model.mm_projector.0.bias": _tensor(h)})
    top.update({"model.mm_projector.2.weight": _tensor(h, h), "model.mm_projector.2.bias": _tensor(h)})
    top["model.query_tokens"] = _tensor(1, 8, 32)
    top["model.mm_audio_aligner.projector.weight"] = _tensor(h, 32)
    top["model.mm_audio_aligner.projector.bias"] = _tensor(h)
    for key, value in whisper.decoder.state_dict().items():
        top[f"model.mm_audio_aligner.decoder.audio_decoder.{key}"] = value.to(torch.float16)
    shards["pytorch_model-00000.bin"] = top
    for layer in range(layers):
        p = f"model.layers.{layer}"
        part = {f"{p}.self_attn.{n}_proj.weight": _tensor(h, h) for n in "qkvo"}
        part[f"{p}.input_layernorm.weight"] = _tensor(h)
        part[f"{p}.post_attention_layernorm.weight"] = _tensor(h)
        part[f"{p}.mlp.gate.weight"] = _tensor(EXPERTS, h)
        for i in range(EXPERTS):
            part[f"{p}.mlp.experts.{i}.gate_proj.weight"] = _tensor(f, h)
            part[f"{p}.mlp.experts.{i}.up_proj.weight"] = _tensor(f, h)
            part[f"{p}.mlp.experts.{i}.down_proj.weight"] = _tensor(h, f)
        shards[f"pytorch_model-{layer + 1:05d}.bin"] = part
    sizes = []
    for name, part in shards.items():
        torch.save(part, base / name)
        sizes.append((base / name).stat().st_size)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    config = dict(vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=layers)
    config.update(num_attention_heads=shape["heads"], rms_norm_eps=1e-5, max_position_embeddings=4096)
    (e2 / "config.json").write_text(json.dumps(config))
    r = 8
    adapter = {}
    for layer in range(layers):
        for module, (rows, cols) in {"self_attn.q_proj": (h, h), "mlp.experts.0.up_proj": (f, h)}.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"] = (
                _tensor(r, cols),
                _tensor(rows, r),
            )
    torch.save(adapter, e2 / "adapter_model.bin")
    (e2 / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 16}))
    torch.save({"base_model.model.model.mm_projector.2.bias": _tensor(h)}, e2 / "non_lora_trainables.bin")
    torch.save({"model.mm_audio_aligner.projector.bias": _tensor(h)}, e2 / "mm_audio_aligner.bin")
    gates = {f"base_model.model.model.layers.{i}.mlp.gate.weight": _tensor(EXPERTS, h) for i in range(layers)}
    torch.save(gates, e2 / "mlp_gates.bin")
    total = sum(sizes) + sum(p.stat().st_size for p in e2.iterdir())
    return base, e2, root / "clip", root / "whisper", total, max(sizes)


# VmHWM (peak resident set of this address space) rather than ru_maxrss, which a child inherits
# from the parent it was forked from.
CHILD = """
import json, sys
from pathlib import Path
import unimoe.release as release

def high_water_mark():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

baseline = high_water_mark()
base, e2, clip, whisper, out = sys.argv[1:6]
release.write_release_directory(base, e2, Path(out), clip=clip, whisper=whisper)
print(json.dumps({"baseline_bytes": baseline, "peak_bytes": high_water_mark()}))
"""


def measure(base: Path, e2: Path, clip: Path, whisper: Path, out: Path) -> dict:
    command = [sys.executable, "-c", CHILD, str(base), str(e2), str(clip), str(whisper), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small layers (for tests)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    shape_name = "quick" if args.quick else "llama-7b"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, e2, clip, whisper, total, shard = write_checkpoint(root, SHAPES[shape_name], args.layers)
        memory = measure(base, e2, clip, whisper, root / "converted")
        written = sum(p.stat().st_size for p in (root / "converted").glob("*.safetensors"))
    peak = memory["peak_bytes"] - memory["baseline_bytes"]
    gib = 2**30
    row = [
        shape_name,
        args.layers,
        total / gib,
        shard / gib,
        written / gib,
        peak / gib,
        peak / (total + shard),
    ]
    headers = [
        "shape",
        "layers",
        "checkpoint GiB",
        "largest shard GiB",
        "written GiB",
        "peak GiB",
        "peak/(ckpt+shard)",
    ]
    print(format_table(headers, [row]))
    result = {
        "results": [dict(zip(headers, row))],
        "memory": memory,
        "summary": {
            "peak_over_checkpoint_plus_shard": peak / (total + shard),
            "peak_over_checkpoint": peak / total,
        },
    }
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()

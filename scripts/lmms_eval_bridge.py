"""Checks the lmms-eval bridge end to end: lmms-eval's OpenAI-compatible model against ``unimoe serve``.

lmms-eval pins packages ours conflict with (``av<16``), so it lives in a virtual environment of its own,
given here as ``--lmms-python``. The check writes a small local lmms-eval task (POPE-style yes/no
questions on the test photo, loaded from a local JSON file rather than the hub), starts
``unimoe serve --model tiny`` on a free loopback port, runs lmms-eval on that task through the server,
and compares every answer lmms-eval logged with what the engine answers for the same messages.

Run: ``python scripts/lmms_eval_bridge.py --lmms-python /path/to/lmms-venv/bin/python``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT / "tests" / "fixtures" / "photo.jpg"
SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTIONS = [
    "Is there a cat in the image?",
    "Is there a person in the image?",
    "Is it daytime?",
    "Is there a car?",
]

TASK = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: unimoe_pope_local
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

UTILS = f"""from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"] + {SUFFIX!r}


def process_results(doc, results):
    return {{"exact": float(results[0].strip().lower() == doc["answer"])}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"unimoe serve did not come up at {url}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lmms-python", required=True, help="python of the virtualenv holding lmms-eval")
    args = parser.parse_args(argv)

    from unimoe.inference import GenerationParams, UniMoeEngine

    work = Path(tempfile.mkdtemp(prefix="lmms-bridge-"))
    tasks = work / "tasks"
    tasks.mkdir()
    data = work / "pope_local.json"
    docs = [
        {"question_id": i, "image": str(PHOTO), "question": q, "answer": "yes"}
        for i, q in enumerate(QUESTIONS)
    ]
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "unimoe_pope_local.yaml").write_text(TASK.format(data=data))
    (tasks / "utils.py").write_text(UTILS)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "unimoe.cli", "serve", "--model", "tiny", "--port", str(port)]
    )
    try:
        wait_healthy(url)
        command = [
            args.lmms_python, "-m", "lmms_eval", "--model", "openai",
            "--model_args", f"model_version=unimoe,base_url={url}/v1,api_key=EMPTY,num_concurrent=2,max_retries=1",
            "--tasks", "unimoe_pope_local", "--include_path", str(tasks), "--batch_size", "1",
            "--output_path", str(work / "out"), "--log_samples",
        ]  # fmt: skip
        lmms = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=work)
    finally:
        server.terminate()
        server.wait(timeout=30)
    if lmms.returncode != 0:
        print(lmms.stdout[-3000:], lmms.stderr[-5000:], sep="\n")
        return 1
    samples = sorted((work / "out").rglob("*samples_unimoe_pope_local*.jsonl"))
    if not samples:
        print("lmms-eval wrote no samples file", lmms.stderr[-3000:], sep="\n")
        return 1
    logged = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    engine = UniMoeEngine.load("tiny")
    rows, same = [], 0
    for sample in sorted(logged, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        answer = sample["filtered_resps"]
        answer = answer[0] if isinstance(answer, list) else answer
        content = [
            {"type": "image", "path": doc["image"]},
            {"type": "text", "text": doc["question"] + SUFFIX},
        ]
        expected = engine.generate(
            [[{"role": "user", "content": content}]], GenerationParams(max_new_tokens=8)
        )[0].text
        same += answer == expected
        rows.append((doc["question_id"], repr(answer), repr(expected)))
    print("question  lmms-eval answer  engine answer")
    for row in rows:
        print(*row, sep="  |  ")
    print(f"{same}/{len(rows)} answers equal; lmms-eval results in {samples[0].parent}")
    return 0 if same == len(rows) == len(QUESTIONS) else 1


if __name__ == "__main__":
    sys.exit(main())

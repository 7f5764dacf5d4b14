"""``unimoe eval`` end to end on tiny files in every input format, with the tiny model: resuming,
bad media, batching, scoring predictions made elsewhere, the judge endpoint and the report."""

import base64
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from unimoe.errors import UniMoeConfigError
from unimoe.evaluation.formats import load_mmbench, load_pope, load_seed, load_vqa, rotate_options
from unimoe.evaluation.runner import EvalSettings, run_eval, score_only

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def media(tmp_path) -> Path:
    root = tmp_path / "media"
    (root / "val2014").mkdir(parents=True)
    for i in range(3):
        shutil.copy(FIXTURES / "photo.jpg", root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    shutil.copy(FIXTURES / "photo.jpg", root / "photo.jpg")
    shutil.copy(FIXTURES / "speech.wav", root / "speech.wav")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def write_vqa(tmp_path) -> tuple[Path, Path]:
    questions = {
        "data_subtype": "val2014",
        "questions": [{"question_id": 10 + i, "image_id": i, "question": f"What is {i}?"} for i in range(3)],
    }
    answers = [["two"] * 10, ["yes"] * 6 + ["no"] * 4, ["a dog"] * 3 + ["cat"] * 7]
    annotations = {
        "annotations": [
            {
                "question_id": 10 + i,
                "answer_type": "other",
                "question_type": "what",
                "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers[i])],
            }
            for i in range(3)
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path / "q.json", tmp_path / "a.json"


def write_release(tmp_path, corrupt: bool = False) -> Path:
    records = []
    for i in range(5):
        image = "corrupt.jpg" if corrupt and i == 2 else "photo.jpg"
        records.append(
            {
                "question_id": f"q{i}",
                "image": image,
                "text": f"Question {i}?",
                "gt": ["yes"] * 10 if i % 2 else ["no"] * 5 + ["two"] * 5,
                "category": "default",
                "conversations": [
                    {
                        "from": "human",
                        "value": f"<image>\nQuestion {i}?\nAnswer the question using a single word or phrase.",
                    },
                    {"from": "gpt", "value": ""},
                ],
            }
        )
    path = tmp_path / "release.json"
    path.write_text(json.dumps(records))
    return path


def test_official_formats_load(tmp_path):
    q, a = write_vqa(tmp_path)
    items = load_vqa(q, annotations=a)
    assert items[0]["record"]["image"] == "val2014/COCO_val2014_000000000000.jpg"
    assert items[2]["target"]["answers"] == ["a dog"] * 3 + ["cat"] * 7  # one per annotator

    pope = tmp_path / "coco_pope_adversarial.json"
    pope.write_text(
        "".join(
            json.dumps({"question_id": i, "image": "photo.jpg", "text": "Is there a cat?", "label": "no"})
            + "\n"
            for i in range(2)
        )
    )
    assert [i["target"] for i in load_pope(pope)] == [{"label": "no", "split": "adversarial"}] * 2

    seed = {
        "question_type": {"Scene Understanding": 1},
        "questions": [
            {"question_id": "s1", "question": "Which?", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
             "answer": "C", "data_id": "photo.jpg", "data_type": "image", "question_type_id": 1},
            {"question_id": "s2", "question": "Video?", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
             "answer": "A", "data_id": "v.mp4", "data_type": "video", "question_type_id": 1},
        ],
    }  # fmt: skip
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    [item] = load_seed(tmp_path / "seed.json")
    assert item["target"]["category"] == "Scene Understanding"
    assert "C. z" in item["record"]["conversations"][0]["value"]

    tsv = tmp_path / "mmbench.tsv"
    image = base64.b64encode((FIXTURES / "photo.jpg").read_bytes()).decode()
    tsv.write_text(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
        f"7\tWhat is shown?\tnan\tcat\tdog\tbird\t\tB\tidentity\t{image}\n"
    )
    items = rotate_options(load_mmbench(tsv, out=tmp_path / "out"))
    assert [i["id"] for i in items] == ["7", "7-r1", "7-r2"]
    assert [i["target"]["answer"] for i in items] == ["B", "A", "C"]  # "dog" moves along
    assert [i["target"]["options"][i["target"]["answer"]] for i in items] == ["dog"] * 3
    assert Path(items[0]["record"]["image"]).read_bytes() == (FIXTURES / "photo.jpg").read_bytes()


def test_eval_vqa_resumes_to_the_same_scores(engine, tmp_path, media):
    q, a = write_vqa(tmp_path)
    settings = EvalSettings(
        "vqav2", q, out=tmp_path / "run", media_root=media, annotations=a, max_new_tokens=3, batch_size=2
    )
    first = run_eval(engine, settings, progress=False)
    assert (
        first["n"] == 3 and first["answered"] == 3 and first["official"] and first["rule"] == "vqa-official"
    )
    lines = (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()
    # a run killed mid-write: one line complete, the next half written
    (tmp_path / "run" / "predictions.jsonl").write_text(lines[0] + "\n" + lines[1][:10])
    second = run_eval(engine, settings, progress=False)
    assert second["metrics"] == first["metrics"]
    assert (tmp_path / "run" / "predictions.jsonl").read_text().splitlines() == lines
    settings.max_new_tokens = 5  # other generation settings: not mixed into the same predictions
    with pytest.raises(UniMoeConfigError, match="max_new_tokens|generation"):
        run_eval(engine, settings, progress=False)


def test_bad_media_is_counted_and_the_run_goes_on(engine, tmp_path, media):
    data = write_release(tmp_path, corrupt=True)
    scores = run_eval(
        engine,
        EvalSettings("okvqa", data, out=tmp_path / "run", media_root=media, max_new_tokens=3),
        progress=False,
    )
    assert scores["errors"] == 1 and scores["answered"] == 4
    assert scores["error_ids"][0]["id"] == "q2" and "corrupt.jpg" in scores["error_ids"][0]["error"]


def test_batched_predictions_equal_batch_size_one(engine, tmp_path, media):
    data = write_release(tmp_path)
    texts = []
    for size in (4, 1):
        out = tmp_path / f"b{size}"
        run_eval(
            engine,
            EvalSettings("okvqa", data, out=out, media_root=media, max_new_tokens=4, batch_size=size),
            progress=False,
        )
        texts.append(
            [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        )
    assert texts[0] == texts[1]


def test_sampled_answers_do_not_depend_on_batching(engine, tmp_path, media):
    data = write_release(tmp_path)
    texts = []
    for size in (3, 1):
        out = tmp_path / f"s{size}"
        settings = EvalSettings(
            "okvqa", data, out=out, media_root=media, max_new_tokens=4, batch_size=size, temperature=1.0
        )
        run_eval(engine, settings, progress=False)
        texts.append(
            [json.loads(line)["text"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        )
    assert texts[0] == texts[1]


def test_score_only_reads_the_release_outputs(tmp_path):
    data = write_release(tmp_path)
    records = json.loads(data.read_text())
    v1 = [dict(r, text=["no", "Yes", "two", "yes", "No."][i]) for i, r in enumerate(records)]
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    scores = score_only(EvalSettings("okvqa", data), tmp_path / "v1.json")
    # q0 "no" vs 5 no + 5 two: leaving a "no" out leaves 4 matches -> 1 every time; q1 "Yes" vs ten
    # "yes": nothing processed -> 0; q2 "two" -> 1; q3 "yes" -> 1; q4 "No." -> "no" -> 1
    assert scores["metrics"]["accuracy"] == pytest.approx(80.0)
    # the 8-expert eval.py overwrites "answer"; the ground truth still comes from --data
    e8 = [dict(r, answer=r["conversations"][0]["value"][:3], gt=["bogus"]) for r in records]
    (tmp_path / "e8.json").write_text(json.dumps(e8))
    scores = score_only(
        EvalSettings("okvqa", data, rule="always-process"), tmp_path / "e8.json", answer_field="answer"
    )
    assert (
        scores["metrics"]["accuracy"] == 0.0 and scores["rule"] == "always-process" and not scores["official"]
    )
    assert scores["missing"] == 0


class _Judge(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        right = "Prediction: yes" in prompt or "Predicted answer: yes" in prompt
        content = '{"pred": "yes", "score": 5}' if right else '{"pred": "no", "score": 1}'
        if "Ground truth" in prompt:
            content = "1.0" if right else "0.2"
        if prompt.startswith("Which option"):
            content = "B" if "wheels" in prompt else "Z"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_judged_benchmarks(tmp_path, judge_url):
    data = write_release(tmp_path)
    records = json.loads(data.read_text())
    preds = [dict(r, text=["yes", "no", "yes", "maybe", "yes"][i]) for i, r in enumerate(records)]
    (tmp_path / "p.json").write_text(json.dumps(preds))
    fallback = score_only(EvalSettings("mmvet", data), tmp_path / "p.json")
    assert not fallback["official"] and "judge" in fallback["note"] and "exact_match" in fallback["metrics"]
    judged = score_only(
        EvalSettings("mmvet", data, judge={"url": judge_url, "model": "m"}), tmp_path / "p.json"
    )
    assert judged["official"] and judged["rule"] == "judge:m"
    assert judged["metrics"]["score"] == pytest.approx(100 * (3 * 1.0 + 2 * 0.2) / 5)
    video = score_only(EvalSettings("activitynet-qa", data, judge={"url": judge_url}), tmp_path / "p.json")
    assert video["metrics"]["accuracy"] == pytest.approx(60.0) and video["metrics"]["score"] == pytest.approx(
        3.4
    )


def test_eval_command_and_report(tmp_path, media, capsys):
    from unimoe.cli import main

    data = write_release(tmp_path)
    out = tmp_path / "runs" / "okvqa"
    args = [
        "eval",
        "--model",
        "tiny",
        "--benchmark",
        "okvqa",
        "--data",
        str(data),
        "--media-root",
        str(media),
    ]
    assert main([*args, "--out", str(out), "--max-new-tokens", "2", "--no-progress"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["generation"] == {"max_new_tokens": 2, "temperature": 0.0, "top_p": 1.0}
    capsys.readouterr()
    assert main(["eval", "--report", str(tmp_path / "runs"), "--variant", "8e"]) == 0
    table = capsys.readouterr().out
    assert "| okvqa | accuracy | vqa-official |" in table and "| 66.4 |" in table
    assert (
        main(["eval", "--benchmark", "okvqa", "--data", str(tmp_path / "nope.json"), "--out", str(out)]) == 3
    )


def test_spoken_multiple_choice_and_clotho_aqa(engine, tmp_path, media):
    def record(i, prompt, **fields):
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": ""}]
        return {"id": f"r{i}", "voice": ["speech.wav"], "conversations": turns, **fields}

    options = "Options:\nA. in the park\nB. at school\nC. at home\nD. on a bus"
    race = [
        record(i, f"<audio>\nWhere are they?\n{options}", answer=["B"], category=[c])
        for i, c in enumerate("mmh")
    ]
    (tmp_path / "race.json").write_text(json.dumps(race))
    scores = run_eval(
        engine,
        EvalSettings(
            "race-audio", tmp_path / "race.json", out=tmp_path / "race", media_root=media, max_new_tokens=2
        ),
        progress=False,
    )
    assert scores["answered"] == 3 and scores["rule"] == "letter"
    preds = {"r0": "The answer is (B).", "r1": "b", "r2": "They are at home."}
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in preds.items())
    )
    scores = score_only(EvalSettings("race-audio", tmp_path / "race.json"), tmp_path / "p.jsonl")
    assert scores["metrics"] == pytest.approx({"accuracy": 200 / 3, "accuracy/h": 0.0, "accuracy/m": 100.0})

    clotho = [
        record(0, "<audio>\nIs it raining?", gt="yes"),
        record(1, "<audio>\nWhat sound?", gt=["a dog barking", "barking"]),
    ]
    (tmp_path / "clotho.json").write_text(json.dumps(clotho))
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"id": "r0", "text": "Yes."}) + "\n" + json.dumps({"id": "r1", "text": "Barking!"}) + "\n"
    )
    scores = score_only(EvalSettings("clotho-aqa", tmp_path / "clotho.json"), tmp_path / "c.jsonl")
    assert scores["metrics"] == {"accuracy/open": 100.0, "accuracy/yes_no": 100.0, "accuracy": 100.0}


def test_mmbench_judge_reads_the_answers_the_rule_cannot(tmp_path, judge_url):
    options = "Options:\nA. a cat\nB. a bus\nC. a tree"
    records = [
        {
            "id": f"MMBench-{i}",
            "image": "photo.jpg",
            "answer": ["B"],
            "conversations": [{"from": "human", "value": f"<image>\nWhat?\n{options}"}],
        }
        for i in range(3)
    ]
    (tmp_path / "mmb.json").write_text(json.dumps(records))
    preds = {"MMBench-0": "B", "MMBench-1": "the thing with wheels", "MMBench-2": "no idea"}
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in preds.items())
    )
    plain = score_only(EvalSettings("mmbench", tmp_path / "mmb.json"), tmp_path / "p.jsonl")
    assert plain["metrics"]["accuracy"] == pytest.approx(100 / 3) and plain["rule"] == "mmbench"
    judged = score_only(
        EvalSettings("mmbench", tmp_path / "mmb.json", judge={"url": judge_url, "model": "j"}),
        tmp_path / "p.jsonl",
    )
    assert judged["metrics"]["accuracy"] == pytest.approx(200 / 3)
    assert judged["rule"] == "mmbench+judge:j" and judged["official"]


def _official_fixture(kind: str, tmp_path: Path) -> tuple[str, Path, dict]:
    """(benchmark, data file, extra settings) for a tiny file in an official format."""
    if kind == "pope":
        path = tmp_path / "coco_pope_random.json"
        lines = [
            {
                "question_id": i,
                "image": "photo.jpg",
                "text": "Is there a cat?",
                "label": "yes" if i % 2 else "no",
            }
            for i in range(4)
        ]
        path.write_text("".join(json.dumps(x) + "\n" for x in lines))
        return "pope", path, {}
    if kind in ("aokvqa", "aokvqa-mc"):
        (tmp_path / "val2017").mkdir()
        shutil.copy(FIXTURES / "photo.jpg", tmp_path / "val2017" / "000000000001.jpg")
        questions = [
            {"question_id": f"a{i}", "image_id": 1, "question": "What is it?", "choices": ["cat", "dog", "car", "tree"],
             "correct_choice_idx": 2, "direct_answers": ["car"] * 10, "difficult_direct_answer": i == 0}
            for i in range(3)
        ]  # fmt: skip
        path = tmp_path / "aokvqa_v1p0_val.json"
        path.write_text(json.dumps(questions))
        return "aokvqa", path, {"rule": "multiple-choice"} if kind == "aokvqa-mc" else {}
    if kind == "mmbench":
        image = base64.b64encode((FIXTURES / "photo.jpg").read_bytes()).decode()
        rows = [f"{i}\tWhat is it?\tnan\tcat\tdog\tcar\t\tC\tobject\t{image}" for i in range(2)]
        path = tmp_path / "mmbench.tsv"
        path.write_text(
            "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n" + "\n".join(rows) + "\n"
        )
        return "mmbench", path, {}
    seed = {"questions": [
        {"question_id": f"s{i}", "question": "Which?", "choice_a": "x", "choice_b": "y", "choice_c": "z", "choice_d": "w",
         "answer": "A", "data_id": "photo.jpg", "data_type": "image", "question_type_id": 1}
        for i in range(3)
    ], "question_type": {"Scene": 1}}  # fmt: skip
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(seed))
    return "seed", path, {}


@pytest.mark.parametrize(
    "kind, count", [("pope", 4), ("aokvqa", 3), ("aokvqa-mc", 3), ("mmbench", 6), ("seed", 3)]
)
def test_official_formats_end_to_end(engine, tmp_path, kind, count):
    shutil.copy(FIXTURES / "photo.jpg", tmp_path / "photo.jpg")
    benchmark, data, extra = _official_fixture(kind, tmp_path)
    settings = EvalSettings(
        benchmark, data, out=tmp_path / "run", media_root=tmp_path, max_new_tokens=2, **extra
    )
    scores = run_eval(engine, settings, progress=False)
    assert scores["n"] == count and scores["answered"] == count and scores["errors"] == 0
    assert scores["official"] == (kind != "aokvqa-mc")
    headline = {"pope": "f1", "mmbench": "circular_accuracy"}.get(benchmark, "accuracy")
    assert 0.0 <= scores["metrics"][headline] <= 100.0
    if kind == "aokvqa":
        assert scores["metrics"]["scored"] == 2  # the difficult direct-answer question is left out

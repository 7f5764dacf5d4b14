"""The README's picture of ``unimoe web``: the page with a real exchange, taken the way the browser
test drives it (``tests/inference/web_browser.py``), with a trained model and one of its examples.

Run: ``python scripts/web_screenshot.py --model runs/demo/stage3/final --examples runs/demo/data/heldout.json
--out docs/web.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "inference"))

from web_browser import ask, bot_messages, browser_page, web_server  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--examples", required=True, help="release-format records (the demo's heldout.json)")
    parser.add_argument("--task", default="image_shape", help="which task's first record to ask")
    parser.add_argument("--out", default=str(ROOT / "docs" / "web.png"))
    args = parser.parse_args(argv)

    records = json.loads(Path(args.examples).read_text())
    record = next(r for r in records if r.get("task") == args.task)
    root = Path(args.examples).parent
    files = [root / record[k] for k in ("image", "video") if isinstance(record.get(k), str)]
    files += [root / f for k in ("speech", "audio") for f in (record.get(k) or [])]
    question = record["conversations"][0]["value"]
    with (
        web_server("--model", args.model, "--examples", args.examples) as url,
        browser_page(url, height=1000) as page,
    ):
        ask(page, question, files)
        bot_messages(page).last.wait_for(timeout=120_000)
        page.wait_for_function(
            "() => !document.querySelector('textarea').disabled", timeout=120_000
        )  # the answer is complete once the textbox is enabled again
        answer = bot_messages(page).last.inner_text()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=args.out, full_page=True)
    gold = record["conversations"][-1]["value"]
    print(f"asked {question!r} -> {answer!r} (gold {gold!r}); screenshot {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

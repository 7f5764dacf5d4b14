"""Captioning metrics (Clotho): CIDEr-D, SPICE and SPIDEr through ``pycocoevalcap`` (the COCO caption
evaluation code; ``pip install unimoe[caption]``).

CIDEr-D tokenises with the Stanford PTB tokenizer, a Java program. Without Java the captions are
tokenised by lower-casing and splitting on non-alphanumerics instead, which moves the score by more
than 1%: the metric is then named ``cider_d_without_ptb_tokenizer`` and a warning says so. SPICE
needs Java and Stanford CoreNLP 3.6.0 (which ``pycocoevalcap`` downloads on first use); when they are
not there, SPICE and SPIDEr (the mean of CIDEr-D and SPICE) are reported as not computed, with why.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UniMoeConfigError

logger = logging.getLogger(__name__)
CAPTION_RULES = ("spider", "cider-d")


def _import():
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as err:
        raise UniMoeConfigError(
            "captioning metrics need pycocoevalcap: pip install 'unimoe[caption]'"
        ) from err
    return Cider, PTBTokenizer


def _simple_tokens(captions: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {
        key: [" ".join(re.findall(r"[a-z0-9]+", c["caption"].lower())) for c in values]
        for key, values in captions.items()
    }


def _spice_missing() -> str | None:
    """Why SPICE cannot run here, or None."""
    if shutil.which("java") is None:
        return "Java is not installed"
    import pycocoevalcap.spice as spice

    lib = Path(spice.__file__).parent / "lib"
    if not list(lib.glob("stanford-corenlp-3.6.0*models.jar")):
        return (
            f"Stanford CoreNLP 3.6.0 is not in {lib} (pycocoevalcap downloads it on first use, with network)"
        )
    return None


def caption_scores(
    references: Sequence[Sequence[str]], predictions: Sequence[str | None], rule: str = "spider"
) -> dict[str, Any]:
    """Corpus CIDEr-D (its usual scale, 0 to 10), and with rule ``spider`` SPICE and SPIDEr. A failed
    prediction is an empty caption."""
    if rule not in CAPTION_RULES:
        raise UniMoeConfigError(f"unknown captioning rule {rule!r}; choose from {CAPTION_RULES}")
    cider, ptb = _import()
    gts = {str(i): [{"caption": r} for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [{"caption": p or ""}] for i, p in enumerate(predictions)}
    out: dict[str, Any] = {}
    if shutil.which("java") is not None:
        tokenizer = ptb()
        gts_tokens, res_tokens = tokenizer.tokenize(gts), tokenizer.tokenize(res)
        name = "cider_d"
    else:
        gts_tokens, res_tokens = _simple_tokens(gts), _simple_tokens(res)
        name = "cider_d_without_ptb_tokenizer"
        out["warning"] = (
            "Java is missing: captions were not PTB-tokenised, so CIDEr-D differs from the official "
            "score (by more than 1%); install Java for the official number"
        )
        logger.warning(out["warning"])
    out[name] = float(cider().compute_score(gts_tokens, res_tokens)[0])
    if rule == "spider":
        reason = _spice_missing()
        if reason is None:
            from pycocoevalcap.spice.spice import Spice

            out["spice"] = float(Spice().compute_score(gts_tokens, res_tokens)[0])
            if name == "cider_d":
                out["spider"] = (out["cider_d"] + out["spice"]) / 2
        else:
            out["spice"] = out["spider"] = f"not computed: {reason}"
    return out

"""VQA accuracy as the official VQA evaluation computes it (``vqaEval.py`` of GT-Vision-Lab/VQA, master
since commit a013f00, 2021), and the alternative rule popular harnesses apply.

Rules:

* ``vqa-official``: answers are cleaned of newlines and tabs and stripped. Only when the human answers
  are not all the same are they and the prediction processed (punctuation, then number words, articles
  and contractions, lower-cased). So a prediction "Yes" against ten "yes" scores 0. Accuracy is
  ``min(1, matches / 3)`` averaged over the ten leave-one-annotator-out subsets.
* ``always-process``: the prediction and the human answers are always processed (LLaVA's and lmms-eval's
  EvalAI answer processor), then the same leave-one-out average.

Answers are kept one per annotator: duplicates are separate answers, so leaving one out removes one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

VQA_RULES = ("vqa-official", "always-process")

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# The official pattern: "(?!<=" is a typo for a lookbehind, so it strips every period not before a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PUNCT = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]


def process_punctuation(text: str) -> str:
    """The official punctuation step: a mark next to a space (or any mark when the text has a
    digit-comma-digit) is deleted, otherwise replaced by a space; then periods not before a digit go
    (at most 32 of them: the official call passes ``re.UNICODE`` as the count)."""
    out = text
    for mark in _PUNCT:
        if (mark + " " in text or " " + mark in text) or _DIGIT_COMMA_DIGIT.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)


def process_digit_article(text: str) -> str:
    """The official word step: lower-case, number words to digits, articles dropped, contractions
    given their apostrophes."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalise_vqa_answer(text: str) -> str:
    """Both processing steps (what the EvalAI answer processor applies to every answer)."""
    return process_digit_article(process_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], rule: str = "vqa-official") -> float:
    """The accuracy in [0, 1] of one prediction against the human ``answers`` (one per annotator)."""
    if rule not in VQA_RULES:
        raise ValueError(f"unknown VQA rule {rule!r}; choose from {VQA_RULES}")
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    answers = [_clean(a) for a in answers]
    prediction = _clean(prediction)
    if rule == "always-process" or len(set(answers)) > 1:
        answers = [process_digit_article(process_punctuation(a)) for a in answers]
        prediction = process_digit_article(process_punctuation(prediction))
    total = 0.0
    for left_out in range(len(answers)):
        matches = sum(a == prediction for i, a in enumerate(answers) if i != left_out)
        total += min(1.0, matches / 3)
    return total / len(answers)

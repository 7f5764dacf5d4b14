"""Trains the tiny LLaMA-format SentencePiece tokenizer shipped in ``unimoe/assets/tokenizer``.

It follows LLaMA's conventions (BPE, byte fallback, unk 0, bos 1, eos 2) with a small vocabulary,
so that tiny models for tests and the demo have a real tokenizer. Run from the repository root:
``python scripts/make_tiny_tokenizer.py``.
"""

from pathlib import Path

import sentencepiece as spm

CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the user's questions. USER: ASSISTANT:
What shape is in the picture? What shape is this? Which shape do you see? Name the shape.
What colour is the shape? What color is it? Which colour is the moving shape?
Which way does the shape move? In which direction is it moving? left right up down.
What word is spoken? What does the speaker say? Which word do you hear?
What sound is this? What kind of sound do you hear? Describe the sound.
Does the spoken word name the shape in the picture? yes no.
circle square triangle cross star diamond red green blue yellow purple orange white black.
one two three four five six seven eight nine ten zero.
low tone high tone chirp noise clicks beep hum whistle rhythm silence music speech.
The image shows a photo of a person, a cat, a cup of coffee. Describe the image in detail.
The video shows a moving object. The audio contains a sound. Listen to the speech and answer.
Please answer the question with one word. Answer with yes or no. Thank you.
"""


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "src" / "unimoe" / "assets" / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    lines = [line.strip() for line in CORPUS.strip().splitlines()] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tokenizer"),
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()


if __name__ == "__main__":
    main()

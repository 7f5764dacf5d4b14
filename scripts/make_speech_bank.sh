#!/usr/bin/env bash
# Regenerate the spoken-word bank in src/unimoe/assets/speech/ with espeak-ng.
#
# Each vocabulary word is spoken by VARIANTS voice/speed/pitch settings and written as
# {word}_{variant}.wav: 16 kHz mono PCM16, leading/trailing silence trimmed, peak-normalised.
# unimoe.data.synth uses variants 0-5 for training samples and 6-7 for held-out samples, so
# held-out speech comes from voice settings the model never heard.
#
# Needs: espeak-ng (Debian: apt-get install espeak-ng) and a Python with numpy, soundfile, soxr
# (the project virtualenv). Usage: scripts/make_speech_bank.sh [python]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${1:-$ROOT/.venv/bin/python}"
OUT="$ROOT/src/unimoe/assets/speech"
WORDS=(circle square triangle cross one two)
# voice speed(words/min) pitch(0-99), one line per variant
VARIANTS=(
  "en-us+m3 150 50"
  "en-gb+f2 140 60"
  "en-gb-scotland+m1 160 40"
  "en-029+f4 130 55"
  "en-us+m7 170 35"
  "en-gb-x-rp+f3 145 70"
  "en-us+f1 155 65"
  "en-gb+m2 135 45"
)

command -v espeak-ng >/dev/null || { echo "espeak-ng not found" >&2; exit 1; }
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
rm -f "$OUT"/*.wav

for word in "${WORDS[@]}"; do
  for i in "${!VARIANTS[@]}"; do
    read -r voice speed pitch <<<"${VARIANTS[$i]}"
    espeak-ng -v "$voice" -s "$speed" -p "$pitch" -w "$TMP/${word}_${i}.wav" "$word"
  done
done

"$PYTHON" - "$TMP" "$OUT" <<'PY'
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for path in sorted(src.glob("*.wav")):
    wav, sr = sf.read(path, dtype="float32")
    wav = soxr.resample(wav, sr, 16000)
    loud = np.flatnonzero(np.abs(wav) > 0.02 * np.abs(wav).max())
    pad = 160  # keep 10 ms around the voiced region
    wav = wav[max(loud[0] - pad, 0) : loud[-1] + pad]
    wav = 0.9 * wav / np.abs(wav).max()
    sf.write(dst / path.name, wav, 16000, subtype="PCM_16")
PY
echo "wrote $(ls "$OUT"/*.wav | wc -l) clips ($(du -sh "$OUT" | cut -f1)) to $OUT"

"""What the ablation fixes before any MoE variant runs: the task suite, the budgets, the measures and
the criteria each claim is judged by.

The suite (``ABLATION_TASKS`` in ``unimoe.demo.tasks``) is harder than the demo's: two media of one
modality in a prompt (two images, two spoken words, two sounds), questions that bind attributes
(the colour of the named one of two shapes; a clip checked against colour, shape and direction at once),
two cross-modal tasks (speech with an image, speech with a clip), and per-modality imbalance in the
training counts (images 800 records, video 300, speech 200, audio 100, cross-modal 400; with the
perception tasks 1400, 700, 400, 200 and 400).

The training mixture also holds perception tasks (one medium, described: the demo's single-media
tasks), which are not scored. Stage 1 (connector alignment, shared by every variant) trains on them
alone, as the paper aligns on captions and transcripts; the text warm-up reads the whole mixture with
captions in place of the media.

Budgets are counted in optimiser steps of one batch size, so every variant sees the same number of
training samples after stage 1: ``mixed_steps + stage2_steps * len(stage-2 experts)``. The variants with
stage 2 spend ``stage2_steps`` per modality expert on its modality's tasks and ``mixed_steps`` on the
mixed data; the others spend all of it on the mixed data.

Measures: held-out accuracy per task (first word against the gold answer), mean and standard
deviation over seeds; paired differences against ``dense`` over (task, seed) pairs with a percentile
bootstrap 95% interval and a sign test; per MoE layer the normalised mutual information between a
media token's modality and its first-choice expert, and for the Uni-MoE variants the share of each
modality's tokens whose first choice is the expert pre-trained on it.

Claims and their criteria (``held``: the 95% interval lies above 0; ``contradicted``: below; otherwise
``not shown``):

- (a) ``uni-moe`` minus ``dense`` accuracy over (task, seed) pairs;
- (b) ``uni-moe`` minus ``generic-moe`` accuracy over (task, seed) pairs;
- (c) ``uni-moe`` minus ``generic-moe`` media NMI over (seed, MoE layer) pairs, and, for ``held``,
  also a mean own-expert share above 0.5 (most of a modality's tokens pick its own expert first).
"""

from __future__ import annotations

from ..demo.tasks import ABLATION_TASKS

TRAIN_COUNTS: dict[str, int] = {
    "image_pair_color": 400,
    "image_pair_same": 400,
    "video_check": 300,
    "speech_pair_second": 200,
    "audio_pair_same": 100,
    "cross_speech_image": 200,
    "cross_speech_video": 200,
}
assert tuple(TRAIN_COUNTS) == ABLATION_TASKS
HELDOUT_PER_TASK = 60
# Perception tasks (the demo's single-media tasks: shape, colour, direction, the spoken word, the sound)
# join the training mixture, with the same imbalance, as captioning and ASR data join the paper's; they
# are not scored. Stage 1 aligns the connectors on them alone.
PERCEPTION_COUNTS: dict[str, int] = {
    "image_shape": 300,
    "image_color": 300,
    "video_direction": 200,
    "video_color": 200,
    "speech_word": 200,
    "audio_sound": 100,
}
BATCH_SIZE = 16
STEPS = {"text": 1500, "stage1": 1000, "stage2": 200, "mixed": 1200}
LEARNING_RATES = {"text": 3e-3, "stage1": 3e-3, "stage2": 2e-3, "mixed": 2e-3}
SEEDS = (0, 1, 2)
BOOTSTRAP_SAMPLES = 10000
OWN_SHARE_THRESHOLD = 0.5
CLAIMS = {
    "a": "An MoE multimodal LLM (uni-moe) beats a dense model of the same active size (dense).",
    "b": "Pre-training modality experts (stage 2) then tuning the MoE (uni-moe) beats a generic MoE "
    "applied to the mixed data directly (generic-moe).",
    "c": "The experts specialise by modality: uni-moe's routing carries more information about a media "
    "token's modality than generic-moe's, and most of a modality's tokens pick its own expert first.",
}
# the commit that fixed this file, the suite and the dense results before any MoE variant ran
PREREGISTRATION_COMMIT: str | None = "6e93bc5189fac5fe66ff047e1bca2f445a2a49bf"

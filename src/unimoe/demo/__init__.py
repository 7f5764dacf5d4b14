"""The demo: the whole system at small scale on synthetic data it makes itself (``unimoe demo``).

``pipeline`` runs it (independent jobs side by side, ``background``); ``synth`` and ``synth_media`` make
the data set; ``encoder_pretraining`` stands in for the pretrained CLIP, Whisper and BEATs the real
system downloads. The library does not depend on this package.
"""

from .pipeline import DemoSettings, run_demo

__all__ = ["DemoSettings", "run_demo"]

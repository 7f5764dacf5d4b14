"""Inference: one engine (batched, streamed generation) and its adapters (chat, batch files, HTTP)."""

from .engine import GenerationParams, Result, TextStream, UniMoeEngine

__all__ = ["GenerationParams", "Result", "TextStream", "UniMoeEngine"]

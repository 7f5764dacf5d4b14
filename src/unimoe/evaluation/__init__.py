"""Evaluation: closed-set accuracy per task, media-swap controls, routing statistics and plots."""

"""Accuracy spot checks: whole models through any attention backend, lm-eval style (docs/spot.md)."""

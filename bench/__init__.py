"""Benchmarks of the training step, the training loop and the DVC pipeline; run them from the repo root."""

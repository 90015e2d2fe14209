"""Tiny random-weight checkpoints in each model's real on-disk format, for offline tests and benchmarks."""

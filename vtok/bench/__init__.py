"""Evaluation and benchmarking helpers (synthetic contexts, eval models)."""

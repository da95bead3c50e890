"""Offline lm-eval tasks over held-out stdlib text: YAML here, JSONL in data/, built by stdlib.py."""

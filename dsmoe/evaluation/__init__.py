"""Evaluation: perplexity and τ-sweeps, the lm-eval harness, and the `dsmoe eval` commands.

The names below load on first use (PEP 562): the workflow's parse reads the suites without torch.
"""

import importlib

_PUBLIC = {"LOCAL_SUITE": "harness", "PAPER_SUITE": "harness", "run_bench": "harness", "TABLE4_TAUS": "perplexity",
           "evaluate_ppl": "perplexity", "read_activated_pct": "perplexity", "sweep_tau": "perplexity"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))

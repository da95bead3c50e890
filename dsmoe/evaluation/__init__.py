"""Evaluation: perplexity and τ-sweeps, the lm-eval harness, and the `dsmoe eval` commands."""

from .harness import LOCAL_SUITE, PAPER_SUITE, run_bench
from .perplexity import TABLE4_TAUS, evaluate_ppl, read_activated_pct, sweep_tau

__all__ = ["LOCAL_SUITE", "PAPER_SUITE", "TABLE4_TAUS", "evaluate_ppl", "read_activated_pct", "run_bench", "sweep_tau"]

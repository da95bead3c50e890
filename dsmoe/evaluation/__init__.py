"""Evaluation: perplexity and τ-sweeps, the lm-eval harness, and the `dsmoe eval` commands.

The names below load on first use (PEP 562): the workflow's parse reads the suites without torch.
"""

from ..lazy import lazy_exports

_PUBLIC = {"LOCAL_SUITE": "harness", "PAPER_SUITE": "harness", "run_bench": "harness", "TABLE4_TAUS": "perplexity",
           "evaluate_ppl": "perplexity", "read_activated_pct": "perplexity", "sweep_tau": "perplexity"}
__all__ = list(_PUBLIC)

__getattr__, __dir__ = lazy_exports(globals(), _PUBLIC)

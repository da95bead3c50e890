"""Tables, claims and figures of a run, beside the paper's published numbers (the notebooks use these)."""

from .budget import budget_table
from .bootstrap import PairedDiff, interpolation, paired_bootstrap, windows_of
from .diagnostics import diagnostics_table, has_diagnostics, massive_table
from .reproduced import claims, run_claims
from .plots import (explorer_heatmap, gate_margin_figure, heatmap, heatmap_grid, layer_profile, no_gx_curve, pilot_curves, tau_curves,
                    token_activity, token_curve)
from .run_data import PAPER_RESULTS, collect, find_run, load_paper, load_run, overall, run_config, save_figure, save_table
from .seeds import seed_table
from .shape import band_means, is_w_shaped, w_shape_claim
from .tables import paper_methods, paper_tasks, primary_scores, table1, table2, table3, table4, table5_6

__all__ = [
    "PAPER_RESULTS",
    "PairedDiff",
    "band_means",
    "budget_table",
    "claims",
    "collect",
    "diagnostics_table",
    "explorer_heatmap",
    "find_run",
    "gate_margin_figure",
    "has_diagnostics",
    "heatmap",
    "heatmap_grid",
    "interpolation",
    "is_w_shaped",
    "layer_profile",
    "load_paper",
    "load_run",
    "massive_table",
    "no_gx_curve",
    "overall",
    "paired_bootstrap",
    "paper_methods",
    "paper_tasks",
    "pilot_curves",
    "primary_scores",
    "run_claims",
    "run_config",
    "save_figure",
    "save_table",
    "seed_table",
    "table1",
    "table2",
    "table3",
    "table4",
    "table5_6",
    "tau_curves",
    "token_activity",
    "token_curve",
    "w_shape_claim",
    "windows_of",
]

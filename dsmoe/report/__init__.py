"""Tables, claims and figures of a run, beside the paper's published numbers (the notebooks use these)."""

from .plots import explorer_heatmap, heatmap, layer_profile, no_gx_curve, pilot_curves, tau_curves, token_activity
from .run_data import PAPER_RESULTS, collect, load_paper, load_run, overall, save_figure, save_table
from .tables import claims, paper_methods, primary_scores, table1, table2, table3, table4

__all__ = [
    "PAPER_RESULTS",
    "claims",
    "collect",
    "explorer_heatmap",
    "heatmap",
    "layer_profile",
    "load_paper",
    "load_run",
    "no_gx_curve",
    "overall",
    "paper_methods",
    "pilot_curves",
    "primary_scores",
    "save_figure",
    "save_table",
    "table1",
    "table2",
    "table3",
    "table4",
    "tau_curves",
    "token_activity",
]

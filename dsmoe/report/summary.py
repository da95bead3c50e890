"""`dsmoe report summary`: the lines `make demo` ends with: where the results are, Table 1's main rows,
the routing the run shows, and how to open the notebooks."""

from pathlib import Path

from .run_data import load_paper, load_run
from .tables import table1

ROWS = ("dense", "dsmoe", "topk")  # and the first pruning baseline of the run
OPEN_NOTEBOOKS = "make lab   (JupyterLab on notebooks/; each notebook reads results/default, else results/cpu-study-paper)"


def table1_rows(ppl):
    """Table 1's dense, DSMoE, top-k and first prune_* rows: model, ppl, activated % of dense."""
    table = table1(ppl, load_paper()).set_index("model")
    pruned = [m for m in table.index if str(m).startswith("prune_")][:1]
    return [(m, float(table.loc[m, "ppl"]), float(table.loc[m, "activated_pct_of_dense"]))
            for m in (*ROWS, *pruned) if m in table.index]


def routing_lines(data):
    """The DSMoE τ-sweep's activated range and the spread of its per-layer mean active experts."""
    lines = []
    sweep = data["sweep"]
    curve = sweep[sweep["variant"] == "dsmoe"].sort_values("tau") if "variant" in sweep else sweep.iloc[:0]
    if len(curve):
        first, last = curve.iloc[0], curve.iloc[-1]
        lines.append(f"DSMoE τ-sweep: τ {first['tau']:g} → {last['tau']:g}: activated params "
                     f"{first['activated_params_pct']:.1f}% → {last['activated_params_pct']:.1f}%")
    layers = data["layers"]
    if "source" in layers:
        rows = layers[(layers["model"] == "dsmoe") & (layers["source"] != "all")]
        if len(rows):
            profile = rows.groupby("layer")["mean_active_experts"].mean()
            lines.append(f"DSMoE per layer: {profile.min():.2f} to {profile.max():.2f} active experts "
                         f"(layers {profile.idxmin()} and {profile.idxmax()}; spread {profile.max() - profile.min():.2f})")
    return lines


def summary(run_dir):
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    lines = [f"Results: {run_dir}/ (tables/, figures/, notebooks/; claims in {run_dir}/tables/claims.md)",
             "Table 1 (validation perplexity, activated params as % of dense):"]
    lines += [f"  {model:<20} ppl {ppl:>12.4g}   activated {pct:5.1f}%" for model, ppl, pct in table1_rows(data["ppl"])]
    lines += routing_lines(data)
    lines += ["A short run shows routing, not the paper's quality claims (see the CPU study in results/cpu-study-mild/",
              "and results/cpu-study-paper/, and config/paper-*.yaml).", f"Open the notebooks: {OPEN_NOTEBOOKS}"]
    return "\n".join(lines)

"""Tables and figures of a run, beside the paper's published numbers.

The notebooks in notebooks/ import these helpers; `dsmoe figures collect` gathers a run's
evaluation CSVs into results/<run>/data/, which is all the notebooks read.
"""

import io
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .io import atomic_file, write_csv

PAPER_RESULTS = Path(__file__).parent / "paper_results.yaml"
DATA_FILES = ["ppl", "layers", "bench", "sweep", "sweep_layers", "drop"]
MODEL_ORDER = ["dense", "dense_continued", "dsmoe", "no_ste", "no_gx", "topk", "prune_channel", "prune_wanda", "drop"]


# --- run data --------------------------------------------------------------------------------


def collect(paths, out_dir):
    """Concatenate evaluation CSVs by file name (ppl.csv, layers.csv, ...) into `out_dir`."""
    groups = defaultdict(list)
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"evaluation file {str(path)!r} does not exist")
        groups[path.stem].append(pd.read_csv(path))
    unknown = sorted(set(groups) - set(DATA_FILES))
    if unknown:
        raise ValueError(f"do not know how to collect {unknown}; expected files named {DATA_FILES} (.csv)")
    for name in DATA_FILES:
        frames = groups.get(name, [])
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["model"])
        write_csv(df, Path(out_dir) / f"{name}.csv")


def load_run(run_dir):
    """The collected data of a run: {name: DataFrame} for ppl, layers, bench, sweep, sweep_layers, drop."""
    data_dir = Path(run_dir) / "data"
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir} does not exist; run the workflow (rule collect) first")
    return {name: pd.read_csv(data_dir / f"{name}.csv") for name in DATA_FILES}


def load_paper(path=PAPER_RESULTS):
    return yaml.safe_load(Path(path).read_text())


def activated_pct(ppl_csv):
    """Activated params (% of total) of a model over all validation sources, from its ppl.csv."""
    df = pd.read_csv(ppl_csv)
    rows = df[df["source"] == "all"]
    if rows.empty:
        raise ValueError(f"{ppl_csv} has no row with source 'all'")
    return float(rows["activated_params_pct"].iloc[0])


def overall(ppl):
    """One row per model (source 'all'), in the paper's order."""
    df = ppl[ppl["source"] == "all"].copy()
    df["order"] = df["model"].map({m: i for i, m in enumerate(MODEL_ORDER)}).fillna(len(MODEL_ORDER))
    return df.sort_values(["order", "model"]).drop(columns="order").set_index("model")


# --- output ----------------------------------------------------------------------------------


def save_figure(fig, figures_dir, name):
    """Write `fig` as NAME.png and NAME.pdf, each atomically."""
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150, bbox_inches="tight")
        with atomic_file(Path(figures_dir) / f"{name}.{ext}", mode="wb") as handle:
            handle.write(buffer.getvalue())


def save_table(df, tables_dir, name, floatfmt=".4g"):
    """Write `df` as NAME.csv and NAME.md (a Markdown table), each atomically."""
    write_csv(df, Path(tables_dir) / f"{name}.csv")
    with atomic_file(Path(tables_dir) / f"{name}.md") as handle:
        handle.write(df.to_markdown(index=False, floatfmt=floatfmt) + "\n")


# --- tables ----------------------------------------------------------------------------------


def paper_methods(paper):
    return {row["ours"]: row["paper"] for row in paper["methods"] if row["ours"]}


def table1(ppl, paper):
    """PPL and activated params per model, beside the paper's row that the model plays.

    Activated params are given as a percent of the dense model's parameters (the paper's matching
    criterion), so a pruned model's smaller total counts too."""
    ours = overall(ppl)
    total = ours["activated_params"] / ours["activated_params_pct"] * 100
    dense_total = total.get("dense", total.max())
    df = pd.DataFrame({
        "model": ours.index,
        "params": total.round().astype("int64").values,
        "activated_params": ours["activated_params"].round().astype("int64").values,
        "activated_pct_of_dense": (100 * ours["activated_params"] / dense_total).values,
        "ppl": ours["ppl"].values,
    })
    methods = paper_methods(paper)
    df["paper_method"] = df["model"].map(lambda m: methods.get("dense" if m == "dense_continued" else m, ""))
    for base, tag in (("LLaMA-1B", "1b"), ("LLaMA-7B", "7b")):
        rows = {r["method"]: r for r in paper["table1"] if r["base"] == base}
        dense = rows["LLaMA (dense)"]["params"]
        df[f"paper_{tag}_activated_pct_of_dense"] = df["paper_method"].map(
            lambda m: 100 * rows[m]["activated_params"] / dense if m in rows else math.nan)
        df[f"paper_{tag}_ppl"] = df["paper_method"].map(lambda m: rows[m]["ppl"] if m in rows else math.nan)
    return df


def primary_scores(bench):
    """model x task table of each task's primary metric, in percent."""
    if bench.empty:
        return pd.DataFrame()
    rows = bench[bench["primary"].astype(str).str.lower() == "true"]
    scores = rows.pivot_table(index="model", columns="task", values="value", aggfunc="first") * 100
    return scores.reindex([m for m in MODEL_ORDER if m in scores.index] + [m for m in scores.index if m not in MODEL_ORDER])


def table2(bench, paper):
    """Benchmark scores (%) of this run's models, followed by the paper's rows (its ten tasks)."""
    ours = primary_scores(bench).reset_index()
    ours.insert(0, "source", "this run")
    tasks = paper["table2"]["tasks"]
    theirs = pd.DataFrame([{"source": f"paper {r['base']}", "model": r["method"], **dict(zip(tasks, r["scores"]))}
                           for r in paper["table2"]["rows"]])
    return pd.concat([ours, theirs], ignore_index=True)


def table3(ppl, bench, paper):
    """DSMoE against the no-STE ablation: PPL and each benchmark, this run beside the paper (LLaMA-1B)."""
    ours = overall(ppl)
    scores = primary_scores(bench)
    rows = []
    for metric in ["ppl"] + list(scores.columns):
        source = ours["ppl"] if metric == "ppl" else scores[metric]
        rows.append({"metric": metric, **{m: source.get(m, math.nan) for m in ("dsmoe", "no_ste")}})
    df = pd.DataFrame(rows)
    theirs = pd.DataFrame(paper["table3"]["rows"]).rename(columns={"dsmoe": "paper_dsmoe", "no_ste": "paper_no_ste"})
    return df.merge(theirs, on="metric", how="outer")


def table4(sweep, paper):
    """The DSMoE τ-sweep: PPL and activated params per τ, beside the paper's LLaMA-7B and -1B."""
    ours = sweep[sweep["variant"] == "dsmoe"][["tau", "ppl", "activated_params_pct", "mean_active_experts"]]
    theirs = pd.DataFrame(paper["table4"]).rename(columns=lambda c: c if c == "tau" else f"paper_{c}")
    return ours.merge(theirs, on="tau", how="outer").sort_values("tau").reset_index(drop=True)


def _ppl_at(curve, activated_pct):
    """PPL of a sweep curve, linearly interpolated at an activated-params percent (None outside it)."""
    curve = curve.sort_values("activated_params_pct")
    x, y = curve["activated_params_pct"].to_numpy(), curve["ppl"].to_numpy()
    if len(x) == 0 or not x[0] <= activated_pct <= x[-1]:
        return None
    return float(np.interp(activated_pct, x, y))


def claims(ppl, sweep):
    """One line per qualitative claim of the paper: reproduced yes/no, with the numbers behind it."""
    ours = overall(ppl)
    lines = []

    def add(claim, ok, evidence):
        lines.append({"claim": claim, "reproduced": "n/a" if ok is None else ("yes" if ok else "no"), "evidence": evidence})

    curve = sweep[sweep["variant"] == "dsmoe"].sort_values("tau")
    if len(curve) >= 2:
        act_falls = bool((curve["activated_params_pct"].diff().dropna() <= 1e-9).all())
        ppl_rises = bool((curve["ppl"].diff().dropna() >= -1e-9).all())
        add("PPL against activated params is monotone in τ", act_falls and ppl_rises,
            f"τ {curve['tau'].min():g}..{curve['tau'].max():g}: activated params non-increasing: {act_falls}; "
            f"PPL non-decreasing: {ppl_rises}")
    else:
        add("PPL against activated params is monotone in τ", None, "no DSMoE τ-sweep in this run")

    if {"dsmoe", "no_ste"} <= set(ours.index):
        a, b = ours.loc["dsmoe"], ours.loc["no_ste"]
        add("DSMoE beats no-STE", a["ppl"] < b["ppl"],
            f"PPL {a['ppl']:.4g} ({a['activated_params_pct']:.1f}% active) vs {b['ppl']:.4g} ({b['activated_params_pct']:.1f}%)")
    else:
        add("DSMoE beats no-STE", None, "dsmoe or no_ste missing from this run")

    if {"dsmoe", "topk"} <= set(ours.index):
        top = ours.loc["topk"]
        matched = _ppl_at(curve, top["activated_params_pct"])
        dsmoe_ppl = ours.loc["dsmoe", "ppl"] if matched is None else matched
        how = "DSMoE τ-sweep interpolated" if matched is not None else "DSMoE at its τ (top-k outside the sweep's range)"
        add("DSMoE beats top-k at matched activation", dsmoe_ppl < top["ppl"],
            f"at {top['activated_params_pct']:.1f}% active: DSMoE PPL {dsmoe_ppl:.4g} ({how}) vs top-k {top['ppl']:.4g}")
    else:
        add("DSMoE beats top-k at matched activation", None, "dsmoe or topk missing from this run")

    no_gx = sweep[sweep["variant"] == "no_gx"]
    if "dsmoe" in ours.index and len(no_gx):
        point = ours.loc["dsmoe"]
        matched = _ppl_at(no_gx, point["activated_params_pct"])
        if matched is None:
            nearest = no_gx.iloc[(no_gx["activated_params_pct"] - point["activated_params_pct"]).abs().argmin()]
            matched, how = float(nearest["ppl"]), f"nearest no-G point, {nearest['activated_params_pct']:.1f}% active"
        else:
            how = "no-G τ-sweep interpolated"
        add("no-G is worse at matched activation", matched > point["ppl"],
            f"at {point['activated_params_pct']:.1f}% active: no-G PPL {matched:.4g} ({how}) vs DSMoE {point['ppl']:.4g}")
    else:
        add("no-G is worse at matched activation", None, "dsmoe or the no_gx sweep missing from this run")
    return pd.DataFrame(lines)


# --- figures ---------------------------------------------------------------------------------


def heatmap(layers, model, ax=None):
    """Fig. 3: mean active experts, layers (rows) x validation sources (columns), of one model."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = layers[(layers["model"] == model) & (layers["source"] != "all")]
    if df.empty:
        raise ValueError(f"no per-layer routing data for model {model!r}")
    grid = df.pivot_table(index="layer", columns="source", values="mean_active_experts")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.28 * grid.shape[0] + 1.5))
    sns.heatmap(grid, ax=ax, annot=grid.shape[0] <= 32, fmt=".1f", cmap="viridis",
                cbar_kws={"label": "mean active experts"})
    ax.set_title(f"{model}: active experts per layer")
    return ax


def layer_profile(layers, models, ax=None):
    """Per-layer mean active experts (averaged over sources), one line per model."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    df = layers[layers["source"] != "all"]
    for model in models:
        profile = df[df["model"] == model].groupby("layer")["mean_active_experts"].mean()
        if len(profile):
            ax.plot(profile.index, profile.values, marker="o", label=model)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean active experts")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax


def tau_curves(sweep, paper=None):
    """Table 4 as curves: PPL and activated params against τ, the paper's LLaMA-1B/7B dashed."""
    import matplotlib.pyplot as plt

    curve = sweep[sweep["variant"] == "dsmoe"].sort_values("tau")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(curve["tau"], curve["ppl"], marker="o", label="this run")
    if curve["ppl"].max() > 100 * curve["ppl"].min():  # an untrained or short run spans decades
        left.set_yscale("log")
    left.set_xlabel("τ")
    left.set_ylabel("PPL (this run)")
    right.plot(curve["tau"], curve["activated_params_pct"], marker="o", label="this run")
    if paper is not None:
        theirs = pd.DataFrame(paper["table4"])
        twin = left.twinx()
        for tag, style in (("llama1b", "--"), ("llama7b", ":")):
            name = "paper LLaMA-" + tag[5:].upper()
            twin.plot(theirs["tau"], theirs[f"{tag}_ppl"], style, color="gray", label=name)
            right.plot(theirs["tau"], theirs[f"{tag}_activated_params_pct"], style, color="gray", label=name)
        twin.set_ylabel("PPL (paper)")
        twin.legend(loc="upper center")
    right.set_xlabel("τ")
    right.set_ylabel("activated params (%)")
    left.legend(loc="upper left")
    right.legend()
    fig.tight_layout()
    return fig


def no_gx_curve(sweep, dsmoe_point):
    """Fig. 2: the no-G model's PPL and active experts against τ; DSMoE's point starred.

    `dsmoe_point`: a row (Series or dict) of the DSMoE model with tau, ppl, mean_active_experts.
    """
    import matplotlib.pyplot as plt

    curve = sweep[sweep["variant"] == "no_gx"].sort_values("tau")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(curve["tau"], curve["ppl"], marker="o", color="C0", label="no-G: PPL")
    ax.set_yscale("log")
    ax.set_xlabel("τ (applied at inference only)")
    ax.set_ylabel("PPL", color="C0")
    twin = ax.twinx()
    twin.plot(curve["tau"], curve["mean_active_experts"], marker="s", color="C1", label="no-G: active experts")
    twin.set_ylabel("mean active experts", color="C1")
    ax.plot([dsmoe_point["tau"]], [dsmoe_point["ppl"]], "*", ms=18, color="C3", label="DSMoE: PPL")
    twin.plot([dsmoe_point["tau"]], [dsmoe_point["mean_active_experts"]], "*", ms=18, color="C2",
              label="DSMoE: active experts")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper center", fontsize=8)
    fig.tight_layout()
    return fig


# --- routing explorer ------------------------------------------------------------------------


def token_activity(model, tokenizer, text):
    """Tokens of `text` and a layers x tokens array of how many experts each token activates."""
    import torch

    from .losses import dsmoe_layers

    layers = dsmoe_layers(model)
    if not layers:
        raise ValueError("the model has no DSMoE layer; load a converted checkpoint")
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        model.eval()(ids)
    activity = np.stack([layer.last_active.reshape(-1, layer.n_experts).sum(-1).cpu().numpy() for layer in layers])
    tokens = tokenizer.convert_ids_to_tokens(ids[0])
    return [token.replace("Ġ", "␣").replace("Ċ", "⏎") for token in tokens], activity


def explorer_heatmap(tokens, activity, n_experts, ax=None):
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.32 * len(tokens)), 0.3 * activity.shape[0] + 1.8))
    sns.heatmap(activity, ax=ax, vmin=0, vmax=n_experts, cmap="magma", xticklabels=tokens,
                cbar_kws={"label": "active experts"})
    ax.set_xlabel("token")
    ax.set_ylabel("layer")
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    return ax


# --- CLI -------------------------------------------------------------------------------------


def register(subparsers):
    p = subparsers.add_parser("figures", help="gather a run's evaluation results for the tables and figures")
    commands = p.add_subparsers(dest="figures_command", required=True, metavar="COMMAND")
    c = commands.add_parser("collect", help="concatenate evaluation CSVs by name (ppl.csv, layers.csv, ...) into a directory")
    c.add_argument("files", nargs="+", help=f"evaluation CSVs; the file name picks the kind ({', '.join(DATA_FILES)})")
    c.add_argument("--out", required=True, help="output directory: one CSV per kind (written atomically)")
    c.set_defaults(func=lambda args: collect(args.files, args.out))
    c = commands.add_parser("activated-pct", help="print a model's activated params (% of total) from its ppl.csv")
    c.add_argument("ppl_csv", help="ppl.csv written by `dsmoe eval ppl`")
    c.set_defaults(func=lambda args: print(f"{activated_pct(args.ppl_csv):.6f}"))

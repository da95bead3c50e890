"""Tables 1-6 of a run beside the paper's numbers, and the "reproduced: yes/no" claims."""

import math

import numpy as np
import pandas as pd

from ..names import METHOD_ORDER, PAPER_TASKS
from .run_data import overall
from .shape import w_shape_claim


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
        rows = {r["method"]: r for r in paper["table1"]["rows"] if r["base"] == base}
        dense = rows["LLaMA (dense)"]["params"]
        df[f"paper_{tag}_activated_pct_of_dense"] = df["paper_method"].map(
            lambda m: 100 * rows[m]["activated_params"] / dense if m in rows else math.nan)
        df[f"paper_{tag}_ppl"] = df["paper_method"].map(lambda m: rows[m]["ppl"] if m in rows else math.nan)
    df["paper_notes"] = df["paper_method"].map(lambda m: paper_notes(paper, m))
    return df


def paper_notes(paper, method):
    """Table 1's notes on a paper method (where the paper contradicts itself), "base: note" joined."""
    return " | ".join(f"{n['base']}: {' '.join(n['note'].split())}" for n in paper["table1"]["notes"] if n["method"] == method)


def primary_scores(bench):
    """model x task table of each task's primary metric, in percent."""
    if bench.empty:
        return pd.DataFrame()
    rows = bench[bench["primary"].astype(str).str.lower() == "true"]
    scores = rows.pivot_table(index="model", columns="task", values="value", aggfunc="first") * 100
    return scores.reindex([m for m in METHOD_ORDER if m in scores.index] + [m for m in scores.index if m not in METHOD_ORDER])


def paper_tasks(paper):
    """The paper's Table 2 columns as lm-eval task names (through `dsmoe.names.PAPER_TASKS`)."""
    return [PAPER_TASKS[key] for key in paper["table2"]["tasks"]]


def table2(bench, paper):
    """Benchmark scores (%) of this run's models, followed by the paper's rows (its ten tasks).

    Columns are lm-eval task names: the paper's in its order, then any other task this run has."""
    ours = primary_scores(bench).reset_index()
    ours.insert(0, "source", "this run")
    tasks = paper_tasks(paper)
    theirs = pd.DataFrame([{"source": f"paper {r['base']}", "model": r["method"], **dict(zip(tasks, r["scores"]))}
                           for r in paper["table2"]["rows"]])
    df = pd.concat([ours, theirs], ignore_index=True)
    return df[["source", "model"] + tasks + [c for c in df.columns if c not in tasks + ["source", "model"]]]


def table3(ppl, bench, paper):
    """DSMoE against the no-STE ablation: PPL and each benchmark, this run beside the paper (LLaMA-1B).

    One row per metric (lm-eval task names; the paper's keys mapped through `dsmoe.names.PAPER_TASKS`)."""
    ours = overall(ppl)
    scores = primary_scores(bench)
    rows = []
    for metric in ["ppl"] + list(scores.columns):
        source = ours["ppl"] if metric == "ppl" else scores[metric]
        rows.append({"metric": metric, **{m: source.get(m, math.nan) for m in ("dsmoe", "no_ste")}})
    df = pd.DataFrame(rows, columns=["metric", "dsmoe", "no_ste"])
    theirs = pd.DataFrame(paper["table3"]["rows"]).rename(columns={"dsmoe": "paper_dsmoe", "no_ste": "paper_no_ste"})
    theirs["metric"] = theirs["metric"].map(lambda key: PAPER_TASKS.get(key, key))
    order = ["ppl"] + paper_tasks(paper)
    df = df.merge(theirs, on="metric", how="outer")
    df["order"] = df["metric"].map({m: i for i, m in enumerate(order)}).fillna(len(order))
    return df.sort_values(["order", "metric"], kind="stable").drop(columns="order").reset_index(drop=True)


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


def table5_6(milestones, paper):
    """Appendix B: perplexity against continued-pretraining tokens, this run's DSMoE model (its
    milestones and its final model) followed by the paper's LLaMA-1B (Table 5) and LLaMA-7B (Table 6)."""
    rows = []
    if milestones is not None and not milestones.empty and "source" in milestones:
        ours = milestones[milestones["source"] == "all"].sort_values("train_tokens")
        rows += [{"source": "this run", "model": r.model, "step": r.step, "tokens": r.train_tokens, "ppl": r.ppl,
                  "activated_params_pct": r.activated_params_pct, "final": bool(r.final)} for r in ours.itertuples()]
    for table in paper["table5_6"]:
        rows += [{"source": f"paper {table['base']} (Table {table['table']})", "model": "DSMoE", "step": math.nan,
                  "tokens": tokens, "ppl": value, "activated_params_pct": math.nan, "final": False}
                 for tokens, value in zip(table["tokens"], table["ppl"])]
    return pd.DataFrame(rows, columns=["source", "model", "step", "tokens", "ppl", "activated_params_pct", "final"])


def claims(ppl, sweep, layers=None):
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

    for label, how_scaled in (("no_gx", "n/k at inference"), ("no_gx_unscaled", "no n/k at inference")):
        add(f"no-G ({how_scaled}) is worse at matched activation", *_no_gx_claim(ours, sweep, label))

    shaped, evidence = w_shape_claim(layers)
    add("W-shaped layer profile (§6.3; five equal layer bands, bands 1, 3, 5 each above bands 2 and 4)", shaped, evidence)
    return pd.DataFrame(lines)


def _no_gx_claim(ours, sweep, label):
    """`(reproduced, evidence)`: the no-G sweep `label` against DSMoE's point at matched activation."""
    no_gx = sweep[sweep["model"] == label] if "model" in sweep else sweep.iloc[0:0]
    if "dsmoe" not in ours.index or no_gx.empty:
        return None, f"dsmoe or the {label} sweep missing from this run"
    point = ours.loc["dsmoe"]
    matched = _ppl_at(no_gx, point["activated_params_pct"])
    if matched is None:
        nearest = no_gx.iloc[(no_gx["activated_params_pct"] - point["activated_params_pct"]).abs().argmin()]
        matched, how = float(nearest["ppl"]), f"nearest no-G point, {nearest['activated_params_pct']:.1f}% active"
    else:
        how = "no-G τ-sweep interpolated"
    return matched > point["ppl"], (f"at {point['activated_params_pct']:.1f}% active: no-G PPL {matched:.4g} ({how}) "
                                    f"vs DSMoE {point['ppl']:.4g}")

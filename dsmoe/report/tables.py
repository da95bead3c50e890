"""Tables 1-6 of a run beside the paper's numbers, and the "reproduced: yes/no" claims."""

import math

import pandas as pd

from ..names import DROP, METHOD_ORDER, PAPER_TASKS
from .reproduced import claims  # noqa: F401 (the claims live in reproduced.py; tables.claims as before)
from .run_data import overall


def paper_methods(paper):
    return {row["ours"]: row["paper"] for row in paper["methods"] if row["ours"]}


def drop_topk_rows(drop):
    """The per-token top-k drop's rows of a collected drop.csv (rule topk), as Table 1 models named
    drop_oracle_top<K>, K descending; an empty frame where the run has none."""
    columns = ["model", "ppl", "activated_params", "activated_params_pct"]
    if drop is None or drop.empty or "rule" not in drop or "keep_experts" not in drop:
        return pd.DataFrame(columns=columns)
    rows = drop[drop["rule"] == "topk"].sort_values("keep_experts", ascending=False)
    return pd.DataFrame({"model": [f"{DROP}_top{int(k)}" for k in rows["keep_experts"]], "ppl": rows["ppl_all"].values,
                         "activated_params": rows["activated_params"].values,
                         "activated_params_pct": rows["activated_params_pct"].values})


def table1(ppl, paper, drop=None):
    """PPL and activated params per model, beside the paper's row that the model plays; then, where the
    run has them (`drop`: its collected drop.csv), the training-free top-k drop's rows at their activation.

    Activated params are given as a percent of the dense model's parameters (the paper's matching
    criterion), so a pruned model's smaller total counts too."""
    ours = overall(ppl).reset_index()[["model", "ppl", "activated_params", "activated_params_pct"]]
    ours = pd.concat([ours, drop_topk_rows(drop)], ignore_index=True) if drop is not None else ours
    total = ours["activated_params"] / ours["activated_params_pct"] * 100
    dense_total = total[ours["model"] == "dense"].iloc[0] if (ours["model"] == "dense").any() else total.max()
    df = pd.DataFrame({
        "model": ours["model"].values,
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

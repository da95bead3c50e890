"""Names shared by the package, the Snakemake workflow and the notebooks: one place for each.

A *method* is what a results row is (the `variant` column of the CSVs): a DSMoE training variant
(`dsmoe.model.VARIANTS`) or one of the dense rows below.
"""

from .model import TOPK_VARIANTS, VARIANTS

DENSE = "dense"  # the base model as it comes
DENSE_CONTINUED = "dense_continued"  # the base model trained on the same data and budget
DROP = "drop_oracle"  # training-free partition and drop: an oracle on the dense FFN (it computes every expert)
PRUNE_KINDS = ("sparsegpt", "llm_pruner_channel", "ffn_channel", "wanda")  # `dsmoe baseline prune --kind`
UNSTRUCTURED_PRUNE_KINDS = ("sparsegpt", "wanda")  # zeroed weights, kept at zero through training


def prune_method(kind):
    """The method name of a pruned baseline: prune_sparsegpt, prune_ffn_channel, prune_wanda."""
    return f"prune_{kind}"


DENSE_METHODS = (DENSE, DENSE_CONTINUED, DROP, *map(prune_method, PRUNE_KINDS))
METHOD_ORDER = [DENSE, DENSE_CONTINUED, *VARIANTS, *map(prune_method, PRUNE_KINDS), DROP]
SWEEP_GRIDS = {"dsmoe": "tau_sweep", "no_gx": "no_gx_tau_sweep"}  # swept variant -> its τ grid in config `eval`
RUN_DATA = ["ppl", "layers", "bench", "sweep", "sweep_layers", "drop"]  # results/<run>/data/<name>.csv
TABLES = ["table1", "table2", "table3", "table4", "claims"]  # results/<run>/tables/<name>.{csv,md}

"""How the intermediate units of a dense FFN are grouped into experts before conversion.

- `contiguous` (the paper, Eq. 6, the default): expert i owns units [i·D/n, (i+1)·D/n).
- `random` (LLaMA-MoE's Random split, the one its paper trains): a seeded random permutation of
  the units, cut into n equal experts.
- `coactivation`: units that fire together go to the same expert. A unit fires on a token when
  its SwiGLU gate pre-activation x·w_gate is > 0 (SiLU then passes most of the signal). Units are
  clustered by balanced k-means on their ±1 firing patterns over the calibration tokens (cosine
  similarity, capacity D/n per expert, greedy assignment by similarity). LLaMA-MoE's co-activation
  split partitions the co-activation graph with METIS; METIS (pymetis) is not a dependency here,
  so this balanced k-means, which groups units with high co-activation, stands in for it.

A split is applied by permuting the rows of gate_proj and up_proj and the columns of down_proj:
the dense FFN computes exactly the same function, and expert i then owns the i-th contiguous slice,
so `DSMoEMLP` needs no index table.
"""

import torch

from .model import PARTITIONS, check_n_experts, decoder_layers


def check_partition(partition):
    if partition not in PARTITIONS:
        raise ValueError(f"unknown partition {partition!r}; choose one of {', '.join(PARTITIONS)}")
    return partition


def random_order(width, seed):
    return torch.randperm(width, generator=torch.Generator().manual_seed(seed))


def balanced_kmeans(features, n_clusters, iterations=10, seed=0):
    """Cluster the rows of `features` (units x dims) into equal clusters; returns the label per unit.

    Written here: scikit-learn's KMeans has no size constraint, and the split needs D/n units per expert."""
    units = features.shape[0]
    check_n_experts(n_clusters, units)
    capacity = units // n_clusters
    x = torch.nn.functional.normalize(features.double(), dim=1)
    centroids = x[random_order(units, seed)[:n_clusters]]
    labels = torch.zeros(units, dtype=torch.long)
    for _ in range(iterations):
        similarity = x @ centroids.T  # units x clusters
        order = torch.argsort(similarity.flatten(), descending=True)
        labels.fill_(-1)
        filled = torch.zeros(n_clusters, dtype=torch.long)
        for flat in order.tolist():
            unit, cluster = divmod(flat, n_clusters)
            if labels[unit] < 0 and filled[cluster] < capacity:
                labels[unit], filled[cluster] = cluster, filled[cluster] + 1
        centroids = torch.stack([x[labels == c].mean(0) for c in range(n_clusters)])
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    return labels


def coactivation_order(mlp, ffn_inputs, n_experts, seed=0):
    """The unit order that puts each balanced co-activation cluster in one contiguous slice."""
    fires = (ffn_inputs.to(mlp.gate_proj.weight.dtype) @ mlp.gate_proj.weight.detach().T) > 0  # tokens x D
    labels = balanced_kmeans(fires.T.double() * 2 - 1, n_experts, seed=seed)
    return torch.argsort(labels, stable=True)


def permute_units(mlp, order):
    """Reorder the intermediate units of a SwiGLU MLP in place (the function is unchanged)."""
    order = order.to(mlp.gate_proj.weight.device)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            weight = getattr(mlp, name).weight
            weight.copy_(weight[order])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])


def partition_units(model, n_experts, partition, ffn_inputs=None, seed=0):
    """Permute every decoder FFN of a dense model so that `partition`'s experts are contiguous slices.

    `ffn_inputs` (a list, one tokens x d tensor per layer) is needed by `coactivation`."""
    check_partition(partition)
    if partition == "contiguous":
        return model
    if partition == "coactivation" and ffn_inputs is None:
        raise ValueError("the coactivation partition needs calibration data (--calibration-data)")
    for i, layer in enumerate(decoder_layers(model)):
        width = layer.mlp.gate_proj.out_features
        if partition == "random":
            order = random_order(width, seed + i)
        else:
            order = coactivation_order(layer.mlp, ffn_inputs[i], n_experts, seed + i)
        permute_units(layer.mlp, order)
    return model


__all__ = ["balanced_kmeans", "check_partition", "coactivation_order", "partition_units", "permute_units", "random_order"]

"""The "W-shaped" layer profile of §6.3, as a tested rule.

The paper: "higher activation counts at both input and output layers, elevated activation in middle
layers, and lower activation in remaining layers". Stated here as: split the per-layer profile
(mean active experts, in depth order) into five contiguous bands of equal size (sizes differ by at
most one layer when five does not divide the depth); the profile is W-shaped when each of the
bands 1, 3 and 5 (input, middle, output) has a higher mean than each of the bands 2 and 4.
"""

import numpy as np

BANDS = 5
HIGH, LOW = (0, 2, 4), (1, 3)  # band indices: input, middle, output / the two valleys


def band_means(profile, bands=BANDS):
    """Mean of each of `bands` contiguous, equal-size bands of a per-layer profile."""
    profile = np.asarray(profile, dtype=float)
    if profile.ndim != 1 or len(profile) < bands:
        raise ValueError(f"a layer profile of at least {bands} layers is needed, got {profile.shape}")
    return [float(band.mean()) for band in np.array_split(profile, bands)]


def is_w_shaped(profile):
    """`(W-shaped, band means)`; `(None, [])` for a profile of fewer than five layers (no five bands)."""
    if len(profile) < BANDS:
        return None, []
    means = band_means(profile)
    return min(means[i] for i in HIGH) > max(means[i] for i in LOW), means


def layer_profile_of(layers, model):
    """Per-layer mean active experts of `model`, averaged over the validation sources ("all" left out)."""
    df = layers[(layers["model"] == model) & (layers["source"] != "all")]
    return df.groupby("layer")["mean_active_experts"].mean().sort_index().to_numpy()


def w_shape_claim(layers, model="dsmoe"):
    """`(reproduced: True/False/None, evidence)` for the W-shape claim on `model`'s layer profile."""
    if layers is None or layers.empty or not (layers["model"] == model).any():
        return None, f"no per-layer routing data for {model}"
    profile = layer_profile_of(layers, model)
    shaped, means = is_w_shaped(profile)
    if shaped is None:
        return None, f"{len(profile)} layers: the rule needs five bands of at least one layer"
    bands = ", ".join(f"{m:.2f}" for m in means)
    return shaped, (f"{model}, {len(profile)} layers in 5 bands, mean active experts {bands}: "
                    f"bands 1, 3, 5 each above bands 2 and 4: {shaped}")

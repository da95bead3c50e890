"""DSMoE model configuration.

A DSMoE checkpoint is its dense base model with every decoder FFN partitioned into
`n_experts` experts and a sigmoid gate added (paper §4). The base model's own config
is kept whole as `text_config`, so any LLaMA-style causal LM (LLaMA, Mistral, Qwen2/3,
SmolLM2) can be the base. This file may import only transformers and its sibling files:
`save_pretrained` copies it next to the weights for `trust_remote_code=True` loading.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

VARIANTS = ("dsmoe", "no_ste", "no_gx", "topk", "topk_switch")
TOPK_VARIANTS = ("topk", "topk_switch")  # fixed k experts per token, no τ
PARTITIONS = ("contiguous", "random", "coactivation")  # how intermediate units are grouped into experts


# The one validation of the DSMoE settings: the config, convert, set_tau and the CLI all call these.
def check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def check_tau(tau):
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must lie in the open interval (0, 1), got {tau!r}")
    return float(tau)


def check_n_experts(n_experts, intermediate_size=None, where=""):
    """`n_experts` must be a positive integer that divides `intermediate_size` (when given)."""
    if isinstance(n_experts, bool) or not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    if intermediate_size is not None and intermediate_size % n_experts:
        raise ValueError(f"n_experts={n_experts} does not divide the intermediate size {intermediate_size}{where}; "
                         f"uneven splits are not supported: choose a divisor of {intermediate_size}")
    return n_experts


def check_gate_init_std(gate_init_std):
    """The std of the gates' normal init must be a positive finite number: with 0 every gate starts at
    σ(0) = 0.5, not above τ = 0.5, so every expert would start (and stay) off."""
    if isinstance(gate_init_std, bool) or not isinstance(gate_init_std, (int, float)) or not 0 < gate_init_std < float("inf"):
        raise ValueError(f"gate_init_std must be a positive number (the std of the gates' normal init; 0 starts "
                         f"every expert off), got {gate_init_std!r}")
    return float(gate_init_std)


def check_top_k(top_k, n_experts):
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k!r} (num_experts_per_tok) must lie in [1, n_experts={n_experts}]")
    return top_k


class DSMoEConfig(PreTrainedConfig):
    r"""
    Args:
        text_config: config of the dense base causal LM (any model type whose decoder MLP is SwiGLU).
        n_experts: number of experts each FFN is split into along the intermediate dimension (Eq. 6).
        tau: activation threshold τ of the gate G (Eq. 7); may be changed after loading.
        variant: training forward. `"dsmoe"` (Eq. 11, straight-through), `"no_ste"` (Eq. 7, Table 3
            ablation), `"no_gx"` (Eq. 20, Fig. 2 ablation), `"topk"` (the LLaMA-MoE baseline as its code
            has it: noisy MLP gate, softmax over the top-k logits, n/k score scale, CV² balance loss) or
            `"topk_switch"` (not the paper's: linear gate, softmax over all experts, top-k weights
            renormalised to sum n, Switch balance loss). Inference uses Eq. 7-8 (top-k for both top-k variants).
        num_experts_per_tok: experts per token of the top-k variants.
        no_gx_inference_rescale: whether the `"no_gx"` variant applies Eq. 8's n/k at inference. It
            is trained with Eq. 20 (Σ σ_i·o_i, no n/k), so True (the default, as every other
            variant) scales its output by n/k over the training scale; False thresholds with G
            (Eq. 7) and keeps the training scale. The paper does not say which it used for Fig. 2.
        gate_init_std: std of the normal init of the gate weights Y (see `DSMoEMLP`).
        gate_init: how the gates were initialised at conversion: "normal" (the paper) or "calibrated".
        base_architecture: class name of the dense model this one was converted from.
        partition: how the dense FFN's intermediate units were grouped into experts at conversion:
            "contiguous" (Eq. 6), "random" or "coactivation" (LLaMA-MoE's neuron splits); the units are
            permuted at conversion so that expert i always owns the i-th contiguous slice.
    """

    model_type = "dsmoe"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    n_experts: int = 8
    tau: float = 0.5
    variant: str = "dsmoe"
    num_experts_per_tok: int = 3
    no_gx_inference_rescale: bool = True
    gate_init_std: float = 0.02
    gate_init: str = "normal"
    base_architecture: str | None = None
    partition: str = "contiguous"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_variant(self.variant)
        check_tau(self.tau)
        check_n_experts(self.n_experts, getattr(self.text_config, "intermediate_size", None))
        check_gate_init_std(self.gate_init_std)
        if self.variant in TOPK_VARIANTS:
            check_top_k(self.num_experts_per_tok, self.n_experts)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


__all__ = ["DSMoEConfig", "PARTITIONS", "TOPK_VARIANTS", "VARIANTS", "check_gate_init_std", "check_n_experts", "check_tau",
           "check_top_k", "check_variant"]

"""The DSMoE model: config, modeling and sparse FFN files, and the block-pruned LLaMA of LLM-Pruner's
block mode (these travel with every checkpoint for `trust_remote_code=True`), plus their
registration with the transformers Auto classes."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_dsmoe import (PARTITIONS, TOPK_VARIANTS, VARIANTS, DSMoEConfig, check_gate_init_std, check_n_experts,
                                  check_tau, check_top_k, check_variant)
from .configuration_pruned_llama import PrunedLlamaConfig
from .modeling_dsmoe import (DSMoEForCausalLM, DSMoEMLP, NoisyTopKGate, check_swiglu, cv_squared, decoder_layers, dsmoe_layers,
                             route, set_no_gx_inference_rescale, set_tau)
from .modeling_pruned_llama import PrunedLlamaForCausalLM

AutoConfig.register("dsmoe", DSMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(DSMoEConfig, DSMoEForCausalLM, exist_ok=True)
DSMoEConfig.register_for_auto_class()
DSMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register("llama_block_pruned", PrunedLlamaConfig, exist_ok=True)  # LLM-Pruner block mode
AutoModelForCausalLM.register(PrunedLlamaConfig, PrunedLlamaForCausalLM, exist_ok=True)
PrunedLlamaConfig.register_for_auto_class()
PrunedLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "PARTITIONS",
    "TOPK_VARIANTS",
    "VARIANTS",
    "DSMoEConfig",
    "DSMoEForCausalLM",
    "DSMoEMLP",
    "NoisyTopKGate",
    "PrunedLlamaConfig",
    "PrunedLlamaForCausalLM",
    "cv_squared",
    "check_gate_init_std",
    "check_n_experts",
    "check_swiglu",
    "check_tau",
    "check_top_k",
    "check_variant",
    "decoder_layers",
    "dsmoe_layers",
    "route",
    "set_no_gx_inference_rescale",
    "set_tau",
]

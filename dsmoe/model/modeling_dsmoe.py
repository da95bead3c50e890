"""DSMoE: matrix-partitioned experts with dynamic routing (Lv et al., EMNLP 2025).

Read top-down: the routing rule (Eq. 7, 8, 10, 11, 20), the FFN layer `DSMoEMLP`, then the
causal LM `DSMoEForCausalLM`, which is the dense base model with every decoder MLP replaced.

Parameter names are the base model's (`model.layers.{i}.mlp.{gate,up,down}_proj.weight`) plus
one gate per layer (`model.layers.{i}.mlp.gate.weight`, Y in Eq. 7, shape n_experts x hidden).
Expert i owns intermediate units [i*D/n, (i+1)*D/n) of the dense FFN (Eq. 6).

This file may import only torch, transformers and its sibling files: `save_pretrained` copies it
next to the weights so that checkpoints load with `trust_remote_code=True` without `dsmoe`.
"""

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers renamed `past_key_values` to `cache` (inputs and outputs) inside the 5.x range that
# dsmoe supports; pass and return the KV cache under the name the installed version uses.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

from .configuration_dsmoe import TOPK_VARIANTS, DSMoEConfig, check_tau
from .sparse_ffn import expert_down_weights, onednn_runs, pack_expert_weights, sparse_expert_ffn


def route(logits, variant, tau, top_k, training, rescale=True):
    """Per-token expert coefficients from gate logits h·Y (shape T x n).

    Returns `(coef, active, probs)`:
      - `coef`: the weight of each expert's output o_i in the FFN output (0 for inactive experts);
      - `active`: bool mask of the experts that are computed (all of them for no_gx training);
      - `probs`: σ(h·Y) (softmax for top-k); `probs * active` is G(σ(h·Y)), Eq. 19's term.
    The n/k rescale (Eq. 8) is a token count and carries no gradient. A token with k = 0 gets
    coef 0 everywhere (output exactly 0); its rescale is taken as n/max(k, 1) so that the
    straight-through gate gradient stays finite. `rescale=False` drops the n/k of the sigmoid
    variants (the no_gx model at inference with `no_gx_inference_rescale` off).
    """
    n = logits.shape[-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # route in fp32 at least
    if variant == "topk_switch":
        probs = torch.softmax(logits, dim=-1)
        top_idx = probs.topk(top_k, dim=-1).indices
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_idx, True)
        weights = probs * active
        coef = weights / weights.sum(-1, keepdim=True) * n
        return coef, active, probs
    probs = torch.sigmoid(logits)
    if training and variant == "no_gx":  # Eq. 20: every expert, weighted by σ, no threshold
        return probs, torch.ones_like(probs, dtype=torch.bool), probs
    active = probs > tau
    gated = probs * active  # G(σ(h·Y)), Eq. 7
    scale = n / active.sum(-1, keepdim=True).clamp(min=1).to(probs.dtype) if rescale else 1.0  # Eq. 8
    if training and variant == "dsmoe":
        gated_ste = gated.detach() + probs - probs.detach()  # S(x) = sg(G(x)) + x - sg(x), Eq. 10
        return gated_ste * scale, active, probs
    return gated * scale, active, probs  # "no_ste" training (Eq. 7) and every variant at inference


class NoisyTopKGate(nn.Module):
    """LLaMA-MoE's gate (`TopKBalancedNoisyGate` of pjlab-sys4nlp/llama-moe, its defaults).

    logits = MLP(h) = tanh(h W₁) W₂ (n x n second layer), plus in training the learned noise
    N(0, 1) · (softplus(h W_noise) + 1e-2), W_noise zero-initialised; the top-k logits get a
    softmax (weights of a token sum to 1), which the experts' outputs are multiplied by, times the
    score scale n/k (LLaMA-MoE's `score_scale_factor`). No noise in eval. The balance loss is
    CV²(importance) + CV²(load), with importance the summed top-k softmax weights per expert and
    load, in training, the smooth count of Shazeer et al. (2017): P(expert stays in the top-k
    under fresh noise). As in LLaMA-MoE's code, the in/out threshold is chosen by comparing the
    noise itself (not the noisy logit) with the (k+1)-th noisy logit; in eval (or k = n), load
    counts the tokens routed to each expert.
    """

    noise_epsilon = 1e-2

    def __init__(self, hidden_size, n_experts, top_k):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.gate_network = nn.Sequential(nn.Linear(hidden_size, n_experts, bias=False), nn.Tanh(),
                                          nn.Linear(n_experts, n_experts, bias=False))
        self.weight_noise = nn.Linear(hidden_size, n_experts, bias=False)
        self.reset_parameters()
        self.last_importance = self.last_load = None

    def reset_parameters(self):
        for linear in (self.gate_network[0], self.gate_network[2]):
            linear.reset_parameters()  # LLaMA-MoE keeps nn.Linear's default init for the MLP gate
        nn.init.zeros_(self.weight_noise.weight)

    def forward(self, x):
        """`(coef, active, weights)` as `route` returns them; weights: the top-k softmax (T x n)."""
        clean = self.gate_network(x).float()
        logits, noise, control = clean, None, None
        if self.training:
            control = nn.functional.softplus(self.weight_noise(x).float()) + self.noise_epsilon
            noise = torch.randn_like(clean) * control
            logits = clean + noise
        k, n = self.top_k, self.n_experts
        top_logits, top_idx = logits.topk(min(k + 1, n), dim=-1)
        weights = torch.zeros_like(logits).scatter(-1, top_idx[:, :k], torch.softmax(top_logits[:, :k], dim=-1))
        active = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top_idx[:, :k], True)
        self.last_importance = weights.sum(0)
        if noise is not None and k < n:
            normal = torch.distributions.Normal(0.0, 1.0)
            threshold_in, threshold_out = top_logits[:, k:k + 1], top_logits[:, k - 1:k]
            prob_in = normal.cdf((clean - threshold_in) / control)
            prob_out = normal.cdf((clean - threshold_out) / control)
            self.last_load = torch.where(noise > threshold_in, prob_in, prob_out).sum(0)
        else:
            self.last_load = active.float().sum(0)
        return weights * (n / k), active, weights


def cv_squared(x, eps=1e-10):
    """Squared coefficient of variation var(x) / (mean(x)² + eps), unbiased var, 0 for one element."""
    if x.shape[0] == 1:
        return x.new_zeros(())
    return x.float().var() / (x.float().mean() ** 2 + eps)


def check_swiglu(mlp, name="mlp"):
    """Raise a TypeError naming `name` and its class unless `mlp` is a bias-free SwiGLU MLP."""
    projections = [getattr(mlp, attr, None) for attr in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) and p.bias is None for p in projections) or not hasattr(mlp, "act_fn"):
        raise TypeError(
            f"module {name!r} is {type(mlp).__name__}, not a SwiGLU MLP: DSMoE needs gate_proj, up_proj "
            "and down_proj (nn.Linear without bias) and act_fn, as in LLaMA, Mistral, Qwen2/3 and SmolLM2"
        )


class DSMoEMLP(nn.Module):
    """A SwiGLU FFN split into `n_experts` experts along its intermediate dimension, with a gate.

    Training computes every expert with full-size GEMMs and weights each expert's slice of the
    intermediate activations by its coefficient (equal to Σ_i coef_i·o_i, since V is linear).
    Inference computes only the active experts (`sparse_expert_ffn`) from cached expert weights,
    built lazily and dropped by `.train()`: on CPU in fp32 or bf16, each expert's weights packed
    for oneDNN (one extra copy of the FFN weights; set `pack_experts = False` to keep only V_iᵀ
    per expert, a third of that, at some speed), elsewhere V_iᵀ contiguous per expert.

    Gate init: Y ~ N(0, gate_init_std²), default 0.02. Each gate then opens for roughly half the
    tokens with σ close to 0.5, so the converted model starts as a randomly routed half-width FFN
    rescaled by n/k·σ ≈ 1; its perplexity before continued pretraining is well above the dense one
    (numbers in the README). A zero init is avoided: σ(0) = 0.5 is not > τ = 0.5, so every expert
    would be off.
    """

    pack_experts = True  # eval on CPU: oneDNN-packed expert weights (see above)

    def __init__(self, config: DSMoEConfig):
        super().__init__()
        text_config = config.text_config
        self.hidden_size = text_config.hidden_size
        self.intermediate_size = text_config.intermediate_size
        self.n_experts = config.n_experts
        self.expert_size = self.intermediate_size // self.n_experts
        self.tau = float(config.tau)
        self.variant = config.variant
        self.top_k = config.num_experts_per_tok
        self.no_gx_inference_rescale = bool(config.no_gx_inference_rescale)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[text_config.hidden_act]
        if self.variant == "topk":
            self.gate = NoisyTopKGate(self.hidden_size, self.n_experts, self.top_k)
        else:
            self.gate = nn.Linear(self.hidden_size, self.n_experts, bias=False)
            nn.init.normal_(self.gate.weight, std=config.gate_init_std)
        self.last_gate_probs = None  # σ(h·Y) (softmax for top-k), T x n, from the latest forward
        self.last_active = None  # bool T x n, from the latest forward
        self.routing_stats = None  # set by dsmoe.RoutingRecorder
        self._expert_cache = None  # (weights, their data_ptr/version and dtype, (V_iᵀ per expert, packed)), eval only

    @classmethod
    def from_dense(cls, mlp, n_experts=None, tau=None, variant=None, top_k=None, gate_init_std=None, name="mlp"):
        """Wrap a dense SwiGLU MLP (`gate_proj`, `up_proj`, `down_proj` Linear without bias, `act_fn`).

        The dense Linear modules are reused, not copied; only the gate Y is new. Settings left at
        None take `DSMoEConfig`'s defaults."""
        check_swiglu(mlp, name)
        hidden, intermediate = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        text_config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
                       "num_attention_heads": 1, "num_key_value_heads": 1}
        settings = {"n_experts": n_experts, "tau": tau, "variant": variant, "num_experts_per_tok": top_k,
                    "gate_init_std": gate_init_std}
        config = DSMoEConfig(text_config=text_config, **{k: v for k, v in settings.items() if v is not None})
        with torch.device("meta"):
            layer = cls(config)
        layer.gate_proj, layer.up_proj, layer.down_proj, layer.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        weight = mlp.gate_proj.weight
        layer.gate = layer.gate.to_empty(device=weight.device).to(weight.dtype)
        layer.init_gate(config.gate_init_std)
        return layer

    def init_gate(self, std):
        self.gate.reset_parameters()  # draws from the RNG as nn.Linear() does: same seed, same gates as before
        if not isinstance(self.gate, NoisyTopKGate):
            nn.init.normal_(self.gate.weight, std=std)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, self.hidden_size)
        if isinstance(self.gate, NoisyTopKGate):
            coef, active, probs = self.gate(x)
        else:
            rescale = self.variant != "no_gx" or self.no_gx_inference_rescale
            coef, active, probs = route(self.gate_logits(x), self.variant, self.tau, self.top_k, self.training, rescale)
        self.last_gate_probs, self.last_active = probs, active
        if self.routing_stats is not None:
            self.routing_stats.update(active)
        coef = coef.to(x.dtype)
        if self.training:
            inter = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            # the coefficient in the intermediate's (compute) dtype: under bf16 autocast an fp32 coefficient
            # would promote the T x D intermediate to fp32 (twice the memory and traffic)
            inter = inter.view(-1, self.n_experts, self.expert_size) * coef.to(inter.dtype).unsqueeze(-1)
            out = self.down_proj(inter.view(-1, self.intermediate_size))
        else:
            down_t, packed = self._expert_weights(x)
            out = sparse_expert_ffn(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight, coef, active,
                                    self.act_fn, down_t=down_t, packed=packed)
        return out.view(hidden_states.shape)

    def gate_logits(self, x):
        """h·Y in fp32 at least, outside autocast: under bf16 mixed precision the routing stays fp32."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return nn.functional.linear(x.to(dtype), self.gate.weight.to(dtype))

    def _expert_weights(self, x):
        """`(down_t, packed)` for `sparse_expert_ffn`: cached expert weights, or None for either.

        Built on first use and rebuilt when a weight is replaced, moved or changed in place (its
        version counter) or the compute dtype changes. Packed (oneDNN) weights where they run the
        compute dtype and nothing needs gradients; else V_iᵀ per expert unless down_proj needs
        gradients. Inference tensors have no version counter: strided views are used for them.
        Writes through `.data` bypass the version counter: call `.eval()` after them."""
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        if any(w.is_inference() for w in weights):
            return None, None
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        autograd = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        pack = self.pack_experts and not autograd and onednn_runs(dtype, x.device)
        if not pack and torch.is_grad_enabled() and weights[2].requires_grad:
            return None, None
        state = (pack, dtype if pack else None, *((w.data_ptr(), w._version) for w in weights))
        cached = self._expert_cache
        if cached is None or cached[1] != state or any(a is not b for a, b in zip(cached[0], weights)):
            with torch.inference_mode(False), torch.no_grad():
                built = (None, pack_expert_weights(*weights, self.n_experts, dtype)) if pack else \
                    (expert_down_weights(weights[2], self.n_experts), None)
            self._expert_cache = cached = (weights, state, built)
        return cached[2]

    def train(self, mode=True):
        self._expert_cache = None
        return super().train(mode)

    def __getstate__(self):  # copy.deepcopy and pickle: packed oneDNN weights have no storage to copy
        return {**super().__getstate__(), "_expert_cache": None}

    def extra_repr(self):
        extra = "" if self.variant != "no_gx" else f", no_gx_inference_rescale={self.no_gx_inference_rescale}"
        return f"n_experts={self.n_experts}, tau={self.tau}, variant={self.variant!r}{extra}"


class DSMoEPreTrainedModel(PreTrainedModel):
    config_class = DSMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, DSMoEMLP):
            module.init_gate(self.config.gate_init_std)
        else:
            super()._init_weights(module)


class DSMoEForCausalLM(DSMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DSMoEConfig):
        super().__init__(config)
        self.model = AutoModel.from_config(config.text_config)
        for layer in self.model.layers:
            layer.mlp = DSMoEMLP(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._no_split_modules = getattr(self.model, "_no_split_modules", None)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        cache = {CACHE_NAME: kwargs.pop(CACHE_NAME, None)}  # the KV cache, as generate() passes it
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )


# ---------------------------------------------------------------- finding and setting DSMoE layers


def dsmoe_layers(module):
    """Every DSMoEMLP inside `module`, the module itself included, in order."""
    return [m for m in module.modules() if isinstance(m, DSMoEMLP)]


def decoder_layers(model):
    """The decoder layers (`model.model.layers`) of a LLaMA-style causal LM."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(model).__name__} has no `model.layers`: DSMoE converts LLaMA-style causal LMs "
            "(LLaMA, Mistral, Qwen2/3, SmolLM2)"
        )
    return layers


def _set_on_layers(model, name, value):
    """Set attribute `name` of every DSMoE layer, and of the config so that it is saved."""
    layers = dsmoe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no DSMoE layer to set {name} on")
    for layer in layers:
        setattr(layer, name, value)
    if isinstance(getattr(model, "config", None), DSMoEConfig):
        setattr(model.config, name, value)
    return model


def set_tau(model, tau):
    """Set the threshold τ of every DSMoE layer (and the config, so that it is saved)."""
    return _set_on_layers(model, "tau", check_tau(tau))


def set_no_gx_inference_rescale(model, rescale):
    """Apply (True) or not (False) Eq. 8's n/k to the no_gx variant at inference, in every layer and the config."""
    if not isinstance(rescale, bool):
        raise ValueError(f"no_gx_inference_rescale must be true or false, got {rescale!r}")
    return _set_on_layers(model, "no_gx_inference_rescale", rescale)


__all__ = ["check_swiglu", "cv_squared", "decoder_layers", "dsmoe_layers", "DSMoEMLP", "NoisyTopKGate", "DSMoEPreTrainedModel",
           "DSMoEForCausalLM", "route", "set_no_gx_inference_rescale", "set_tau"]

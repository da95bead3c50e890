"""The inference FFN (`sparse_expert_ffn`) against the paper's sum over experts (Eq. 6-7)."""

import pytest
import torch
import torch.nn.functional as F

from dsmoe.model.modeling_dsmoe import DSMoEMLP
from dsmoe.model.sparse_ffn import FEW_TOKENS, expert_down_weights, masked_expert_ffn, sparse_expert_ffn

TOLERANCE = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
             torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def sum_over_experts(x, w_gate, w_up, w_down, coef, active):
    """Eq. 7 written out: h_t = Σ_i coef_ti · o_i with o_i = (silu(x W_i) ⊙ x U_i) V_i, active i only."""
    n = coef.shape[1]
    size = w_gate.shape[0] // n
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for i in range(n):
            if active[t, i]:
                rows = slice(i * size, (i + 1) * size)
                o_i = (F.silu(x[t] @ w_gate[rows].t()) * (x[t] @ w_up[rows].t())) @ w_down[:, rows].t()
                out[t] += coef[t, i] * o_i
    return out


def random_ffn(tokens, d=24, D=64, n=8, dtype=torch.float64, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)
    return randn(tokens, d), randn(D, d) / d**0.5, randn(D, d) / d**0.5, randn(d, D) / D**0.5


def activation_pattern(name, tokens, n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if name == "all_on":
        return torch.ones(tokens, n, dtype=torch.bool)
    if name == "all_off":
        return torch.zeros(tokens, n, dtype=torch.bool)
    if name == "one_expert":
        return torch.zeros(tokens, n, dtype=torch.bool).index_fill_(1, torch.tensor([5]), True)
    if name == "runs":  # neighbouring experts, at both ends
        return torch.zeros(tokens, n, dtype=torch.bool).index_fill_(1, torch.tensor([0, 1, 2, 5, 7]), True)
    active = torch.rand(tokens, n, generator=generator) < {"quarter": 0.25, "half": 0.5}[name]
    active[0] = False  # a token with k = 0
    if tokens > 2:
        active[2] = True
    return active


def coefficients(active, seed=1):
    probs = torch.rand(active.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return probs * active * active.shape[1] / active.sum(1, keepdim=True).clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", sorted({1, 2, 5, 50, FEW_TOKENS, FEW_TOKENS + 1}))
@pytest.mark.parametrize("pattern", ["quarter", "half", "all_on", "all_off", "one_expert", "runs"])
@pytest.mark.parametrize("mode", ["views", "cached", "cached_no_grad"])
def test_sparse_matches_masked_reference(dtype, tokens, pattern, mode):
    x, w_gate, w_up, w_down = random_ffn(tokens, dtype=dtype)
    active = activation_pattern(pattern, tokens)
    coef = coefficients(active).to(dtype)
    down_t = None if mode == "views" else expert_down_weights(w_down, 8)
    with torch.set_grad_enabled(mode != "cached_no_grad"):
        out = sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, F.silu, down_t=down_t)
    torch.testing.assert_close(out, masked_expert_ffn(x, w_gate, w_up, w_down, coef, F.silu), **TOLERANCE[dtype])
    assert out[~active.any(1)].eq(0).all()


@pytest.mark.parametrize("tokens", [2, 20])
def test_masked_reference_is_the_sum_over_experts(tokens):
    x, w_gate, w_up, w_down = random_ffn(tokens, seed=3)
    active = activation_pattern("half", tokens, seed=3)
    coef = coefficients(active, seed=4)
    expected = sum_over_experts(x, w_gate, w_up, w_down, coef, active)
    torch.testing.assert_close(masked_expert_ffn(x, w_gate, w_up, w_down, coef, F.silu), expected, **TOLERANCE[torch.float64])
    torch.testing.assert_close(sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, F.silu), expected,
                               **TOLERANCE[torch.float64])


def test_experts_outside_the_mask_contribute_nothing():
    x, w_gate, w_up, w_down = random_ffn(12, seed=5)
    active = activation_pattern("half", 12, seed=5)
    coef = torch.rand(12, 8, dtype=torch.float64)  # nonzero where inactive too
    out = sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, F.silu)
    torch.testing.assert_close(out, sum_over_experts(x, w_gate, w_up, w_down, coef, active))


@pytest.mark.parametrize("tokens", [2, 30])
def test_gradients_flow_through_the_sparse_path(tokens):
    x, w_gate, w_up, w_down = random_ffn(tokens, seed=6)
    active = activation_pattern("half", tokens, seed=6)
    coef = coefficients(active, seed=7)
    grads = []
    for ffn in (lambda *a: sparse_expert_ffn(*a, active, F.silu), lambda *a: masked_expert_ffn(*a, F.silu)):
        inputs = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down, coef)]
        ffn(*inputs).square().sum().backward()
        grads.append([t.grad for t in inputs[:4]] + [inputs[4].grad * active])  # inactive experts: not computed
    for sparse_grad, masked_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, masked_grad)


def test_bfloat16_on_cpu_is_close_to_float64():
    x, w_gate, w_up, w_down = random_ffn(40, seed=8)
    active = activation_pattern("half", 40, seed=8)
    coef = coefficients(active, seed=9)
    expected = masked_expert_ffn(x, w_gate, w_up, w_down, coef, F.silu)
    low = [t.bfloat16() for t in (x, w_gate, w_up, w_down, coef)]
    out = sparse_expert_ffn(*low[:4], low[4], active, F.silu)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4, 300])
@pytest.mark.parametrize("pattern", ["quarter", "half", "all_on", "all_off"])
def test_bfloat16_on_cuda_matches_masked_reference(tokens, pattern):
    x, w_gate, w_up, w_down = random_ffn(tokens, d=256, D=1024, dtype=torch.bfloat16, device="cuda", seed=10)
    active = activation_pattern(pattern, tokens).cuda()
    coef = coefficients(active.cpu()).to("cuda", torch.bfloat16)
    expected = masked_expert_ffn(*(t.double() for t in (x, w_gate, w_up, w_down, coef)), F.silu)
    for down_t in (None, expert_down_weights(w_down, 8)):
        out = sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, F.silu, down_t=down_t)
        assert out.dtype == torch.bfloat16 and out.is_cuda
        torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.bfloat16])


def tiny_layer(seed=0, **kwargs):
    torch.manual_seed(seed)
    dense = torch.nn.Module()
    dense.gate_proj, dense.up_proj = torch.nn.Linear(32, 64, bias=False), torch.nn.Linear(32, 64, bias=False)
    dense.down_proj, dense.act_fn = torch.nn.Linear(64, 32, bias=False), torch.nn.SiLU()
    return DSMoEMLP.from_dense(dense, n_experts=8, gate_init_std=0.5, **kwargs).eval()


def layer_reference(layer, hidden):
    x = hidden.reshape(-1, 32)
    probs = torch.sigmoid(layer.gate(x))
    active = probs > layer.tau
    coef = probs * active * 8 / active.sum(1, keepdim=True).clamp(min=1)
    out = masked_expert_ffn(x, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight, coef, F.silu)
    return out.view(hidden.shape)


@pytest.mark.parametrize("tokens", [1, 40])
def test_layer_in_eval_mode_matches_reference_and_tracks_weight_changes(tokens):
    layer = tiny_layer()
    hidden = torch.randn(2, tokens, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden), layer_reference(layer, hidden))
        cached = layer._expert_down_weights()
        assert cached is layer._expert_down_weights()  # built once
        layer.down_proj.weight.mul_(-2.0)  # in place, as an optimizer step or load_state_dict does
        torch.testing.assert_close(layer(hidden), layer_reference(layer, hidden))
        layer.down_proj.weight = torch.nn.Parameter(torch.randn(32, 64))  # replaced
        torch.testing.assert_close(layer(hidden), layer_reference(layer, hidden))
        layer.double()  # moved
        torch.testing.assert_close(layer(hidden.double()), layer_reference(layer, hidden.double()))
    layer.train()
    assert layer._down_cache is None


def test_layer_cache_adds_no_checkpoint_entries():
    layer = tiny_layer()
    keys = set(layer.state_dict())
    with torch.no_grad():
        layer(torch.randn(1, 20, 32))
    assert layer._down_cache is not None
    assert set(layer.state_dict()) == keys == {"gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate.weight"}


def test_layer_in_eval_mode_with_gradients_skips_the_cache():
    layer = tiny_layer()
    hidden = torch.randn(1, 20, 32)
    layer(hidden).sum().backward()
    assert layer._down_cache is None and layer.down_proj.weight.grad is not None
    reference = tiny_layer()
    layer_reference(reference, hidden).sum().backward()
    torch.testing.assert_close(layer.down_proj.weight.grad, reference.down_proj.weight.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 40])
def test_layer_in_bfloat16_on_cuda_matches_reference(tokens):
    layer = tiny_layer().cuda().bfloat16()
    hidden = torch.randn(2, tokens, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(hidden)
    probs, active = layer.last_gate_probs.double(), layer.last_active  # the bf16 layer's own routing
    coef = probs * active * 8 / active.sum(1, keepdim=True).clamp(min=1)
    weights = (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight)
    expected = masked_expert_ffn(hidden.reshape(-1, 32).double(), *(w.double() for w in weights), coef, F.silu)
    torch.testing.assert_close(out.reshape(-1, 32).double(), expected, **TOLERANCE[torch.bfloat16])

"""DSMoEMLP against a plain write-up of the paper's equations (Eq. 6-8, 10-11, 19, 20).

The reference loops over tokens and experts in float64 and shares no code with dsmoe.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dsmoe
from dsmoe import DSMoEMLP

D_MODEL, D_FF, N_EXPERTS = 12, 24, 4


class DenseSwiGLU(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def reference_forward(x, w_gate, w_up, w_down, y, tau, variant, training):
    """Eq. 6-8 / 11 / 20 token by token. x: T x d, w_gate/w_up: D x d, w_down: d x D, y: n x d."""
    n = y.shape[0]
    e = w_gate.shape[0] // n
    rows = []
    for t in range(x.shape[0]):
        h = x[t]
        sigma = torch.sigmoid(h @ y.T)  # σ(h·Y_i) for every expert i
        experts = []  # o_i, Eq. 7
        for i in range(n):
            units = slice(i * e, (i + 1) * e)
            experts.append((F.silu(h @ w_gate[units].T) * (h @ w_up[units].T)) @ w_down[:, units].T)
        if training and variant == "no_gx":  # Eq. 20
            rows.append(sum(experts[i] * sigma[i] for i in range(n)))
            continue
        on = [bool(sigma[i] > tau) for i in range(n)]
        k = sum(on)
        scale = n / max(k, 1)  # Eq. 8 (k = 0: output is 0 anyway)
        out = torch.zeros_like(h)
        for i in range(n):
            g_thresholded = sigma[i] if on[i] else sigma[i] * 0  # G(σ), Eq. 7
            if training and variant == "dsmoe":  # S(x) = sg(G(x)) + x - sg(x), Eq. 10
                weight = g_thresholded.detach() + sigma[i] - sigma[i].detach()
            else:
                weight = g_thresholded
            out = out + experts[i] * weight
        rows.append(out * scale)
    return torch.stack(rows)


def make_layer(variant, tau=0.5, seed=0):
    torch.manual_seed(seed)
    dense = DenseSwiGLU(D_MODEL, D_FF).double()
    layer = DSMoEMLP.from_dense(dense, n_experts=N_EXPERTS, tau=tau, variant=variant)
    with torch.no_grad():
        layer.gate.weight.copy_(torch.randn(N_EXPERTS, D_MODEL, dtype=torch.float64))
    return layer, dense


def grads(output, tensors, upstream):
    return torch.autograd.grad(output, tensors, upstream, allow_unused=True)


@pytest.mark.parametrize("variant", ["dsmoe", "no_ste", "no_gx"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_gradients_match_equations(variant, training):
    layer, _ = make_layer(variant)
    layer.train(training)
    x = torch.randn(2, 9, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = (torch.sigmoid(x @ layer.gate.weight.detach().T) > 0.5).sum(-1)
    assert (k == 0).any() and (k == N_EXPERTS).any()  # both ends of Eq. 8 are exercised
    x.requires_grad_(True)
    params = [layer.gate.weight, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight]
    out = layer(x)
    ref = reference_forward(x.reshape(-1, D_MODEL), layer.gate_proj.weight, layer.up_proj.weight,
                            layer.down_proj.weight, layer.gate.weight, 0.5, variant, training).view_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    for got, want in zip(grads(out, [x, *params], upstream), grads(ref, [x, *params], upstream)):
        want = torch.zeros_like(got) if want is None else want
        got = torch.zeros_like(want) if got is None else got
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_random_fixture_gives_varied_k():
    layer, _ = make_layer("dsmoe", tau=0.5)
    x = torch.randn(64, D_MODEL, dtype=torch.float64)
    k = (torch.sigmoid(x @ layer.gate.weight.T) > 0.5).sum(-1)
    assert k.min() < k.max()  # k = 0 for every token is forced explicitly in the next test


@pytest.mark.parametrize("variant", ["dsmoe", "no_ste"])
@pytest.mark.parametrize("training", [True, False])
def test_token_with_no_active_expert_outputs_exact_zero(variant, training):
    layer, _ = make_layer(variant, tau=0.9)
    layer.train(training)
    with torch.no_grad():
        layer.gate.weight.zero_()  # σ = 0.5 < τ = 0.9 for every expert: k = 0
    x = torch.randn(5, D_MODEL, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, torch.zeros_like(out))
    if not training:
        return
    out.sum().backward()
    for tensor in (x.grad, layer.gate.weight.grad):
        assert torch.isfinite(tensor).all()
    for weight in (layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight):
        assert weight.grad is None or torch.equal(weight.grad, torch.zeros_like(weight.grad))


@pytest.mark.parametrize("variant", ["dsmoe", "no_ste", "no_gx"])
@pytest.mark.parametrize("training", [True, False])
def test_all_open_gates_give_half_the_dense_ffn(variant, training):
    layer, dense = make_layer(variant, tau=0.3)
    layer.train(training)
    with torch.no_grad():
        layer.gate.weight.zero_()  # σ = 0.5 > τ = 0.3 for every expert: k = n, n/k = 1
    x = torch.randn(3, 7, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(layer(x), 0.5 * dense(x), rtol=1e-12, atol=1e-12)


def test_straight_through_reaches_inactive_gates_but_not_inactive_experts():
    """Eq. 9 (no STE: inactive experts' gates get no gradient) against Eq. 16 (STE: they do)."""
    x = torch.randn(1, D_MODEL, dtype=torch.float64)
    for variant in ("dsmoe", "no_ste"):
        layer, _ = make_layer(variant, seed=3)
        layer.train()
        sigma = torch.sigmoid(x @ layer.gate.weight.T)[0]
        off = torch.nonzero(sigma <= 0.5).flatten()
        assert len(off) and len(off) < N_EXPERTS
        out = layer(x)
        upstream = torch.randn_like(out)
        out.backward(upstream)
        gate_grad_off = layer.gate.weight.grad[off]
        e = D_FF // N_EXPERTS
        for i in off.tolist():
            units = slice(i * e, (i + 1) * e)
            assert torch.equal(layer.down_proj.weight.grad[:, units], torch.zeros(D_MODEL, e, dtype=torch.float64))
            assert torch.equal(layer.gate_proj.weight.grad[units], torch.zeros(e, D_MODEL, dtype=torch.float64))
        if variant == "no_ste":
            assert torch.equal(gate_grad_off, torch.zeros_like(gate_grad_off))
            continue
        # Eq. 16: ∂L/∂Y_i = h^T · (<∂L/∂out, o_i> · n/k · σ'(h·Y_i)) for every expert, on or off
        k = int((sigma > 0.5).sum())
        h = x[0]
        for i in off.tolist():
            units = slice(i * e, (i + 1) * e)
            o_i = (F.silu(h @ layer.gate_proj.weight[units].T) * (h @ layer.up_proj.weight[units].T)) @ layer.down_proj.weight[:, units].T
            expected = h * (upstream[0] @ o_i) * (N_EXPERTS / k) * sigma[i] * (1 - sigma[i])
            torch.testing.assert_close(layer.gate.weight.grad[i], expected.detach(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("variant", ["dsmoe", "no_ste", "no_gx"])
def test_sparsity_loss_is_eq19_with_gradient_through_active_gates_only(variant):
    torch.manual_seed(1)
    layers = nn.ModuleList(make_layer(variant, seed=s)[0] for s in (4, 5))
    layers.train()
    xs = [torch.randn(6, D_MODEL, dtype=torch.float64) for _ in layers]
    for layer, x in zip(layers, xs):
        layer(x)
    loss = dsmoe.sparsity_loss(layers)
    terms, grad_expected = [], []
    for layer, x in zip(layers, xs):
        sigma = torch.sigmoid(x @ layer.gate.weight.detach().T)
        on = torch.ones_like(sigma) if variant == "no_gx" else (sigma > 0.5).double()
        terms.append((sigma * on).mean())  # G(σ(h·Y)) averaged over tokens and experts
        dsigma = sigma * (1 - sigma) * on / (sigma.numel() * len(layers))
        grad_expected.append(dsigma.T @ x)  # n x d
    torch.testing.assert_close(loss, torch.stack(terms).mean(), rtol=1e-12, atol=1e-14)
    loss.backward()
    for layer, expected in zip(layers, grad_expected):
        torch.testing.assert_close(layer.gate.weight.grad, expected, rtol=1e-9, atol=1e-14)


def test_sparsity_loss_needs_a_forward_and_a_dsmoe_layer():
    layer, dense = make_layer("dsmoe")
    with pytest.raises(RuntimeError, match="forward"):
        dsmoe.sparsity_loss(layer)
    with pytest.raises(ValueError, match="no DSMoEMLP"):
        dsmoe.sparsity_loss(dense)


def test_tau_is_a_plain_float_that_changes_routing():
    layer, _ = make_layer("dsmoe")
    layer.eval()
    x = torch.randn(50, D_MODEL, dtype=torch.float64)
    counts = []
    for tau in (0.2, 0.5, 0.8):
        layer.tau = tau
        layer(x)
        counts.append(int(layer.last_active.sum()))
    assert counts[0] > counts[1] > counts[2]


def test_from_dense_keeps_every_dense_weight_and_partitions_in_order():
    layer, dense = make_layer("dsmoe")
    assert layer.gate_proj.weight is dense.gate_proj.weight
    assert layer.down_proj.weight is dense.down_proj.weight
    assert layer.gate.weight.shape == (N_EXPERTS, D_MODEL)
    # Eq. 6: the sum of all experts' outputs is the dense FFN
    x = torch.randn(4, D_MODEL, dtype=torch.float64)
    e = D_FF // N_EXPERTS
    total = sum(
        (F.silu(x @ dense.gate_proj.weight[i * e:(i + 1) * e].T) * (x @ dense.up_proj.weight[i * e:(i + 1) * e].T))
        @ dense.down_proj.weight[:, i * e:(i + 1) * e].T
        for i in range(N_EXPERTS)
    )
    torch.testing.assert_close(total, dense(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_experts": 5}, "does not divide"),
        ({"tau": 1.0}, "open interval"),
        ({"tau": 0.0}, "open interval"),
        ({"variant": "moe"}, "variant"),
    ],
)
def test_from_dense_rejects_bad_arguments(kwargs, message):
    dense = DenseSwiGLU(D_MODEL, D_FF)
    with pytest.raises(ValueError, match=message):
        DSMoEMLP.from_dense(dense, **kwargs)


def test_from_dense_names_a_non_swiglu_module():
    mlp = nn.Sequential(nn.Linear(D_MODEL, D_FF), nn.GELU(), nn.Linear(D_FF, D_MODEL))
    with pytest.raises(TypeError, match=r"'blocks\.3\.ffn' is Sequential, not a SwiGLU MLP"):
        DSMoEMLP.from_dense(mlp, name="blocks.3.ffn")


def test_no_gx_inference_rescale_drops_only_eq8():
    """no_gx trained with Eq. 20 (no n/k); at inference Eq. 7 with Eq. 8's n/k (default) or without it."""
    layer, _ = make_layer("no_gx")
    x = torch.randn(40, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k = (torch.sigmoid(x @ layer.gate.weight.detach().T) > 0.5).sum(-1, keepdim=True)
    assert layer.no_gx_inference_rescale is True
    layer.eval()
    with torch.no_grad():
        rescaled = layer(x)
        layer.no_gx_inference_rescale = False
        unscaled = layer(x)
    # rescaled = n/k x unscaled, token by token (k = 0: both 0)
    torch.testing.assert_close(rescaled, unscaled * N_EXPERTS / k.clamp(min=1), rtol=1e-10, atol=1e-12)
    assert ((k > 0) & (k < N_EXPERTS)).any()
    layer.train()  # training is Eq. 20 either way
    eq20 = reference_forward(x, layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight,
                             layer.gate.weight, 0.5, "no_gx", True)
    torch.testing.assert_close(layer(x), eq20, rtol=1e-10, atol=1e-12)
    for variant in ("dsmoe", "no_ste"):  # the option touches no_gx only
        other, _ = make_layer(variant)
        other.eval().no_gx_inference_rescale = False
        with torch.no_grad():
            torch.testing.assert_close(other(x), reference_forward(x, other.gate_proj.weight, other.up_proj.weight,
                                                                   other.down_proj.weight, other.gate.weight, 0.5,
                                                                   variant, False), rtol=1e-10, atol=1e-12)

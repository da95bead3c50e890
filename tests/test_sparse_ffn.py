"""The inference FFN (`sparse_expert_ffn`) against the paper's sum over experts (Eq. 6-7)."""

import pytest
import torch
import torch.nn.functional as F

from dsmoe.model import sparse_ffn
from dsmoe.model.modeling_dsmoe import DSMoEMLP
from dsmoe.model.sparse_ffn import (FEW_TOKENS, expert_down_weights, masked_expert_ffn, onednn_runs, pack_expert_weights,
                                    sparse_expert_ffn)

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


PATTERNS = ["quarter", "half", "all_on", "all_off", "one_expert", "runs"]
TOKEN_COUNTS = sorted({1, 2, 5, 50, FEW_TOKENS, FEW_TOKENS + 1})
needs_onednn = pytest.mark.skipif(not onednn_runs(torch.float32), reason="this torch has no oneDNN linear on CPU")


def sparse_with(mode, x, w_gate, w_up, w_down, coef, active, act_fn=F.silu):
    """The eval path with the expert weights of `mode`: views, V_iᵀ cache (with or without autograd), packed."""
    down_t = expert_down_weights(w_down, 8) if mode.startswith("cached") else None
    packed = pack_expert_weights(w_gate, w_up, w_down, 8) if mode == "packed" else None
    with torch.set_grad_enabled(mode not in ("cached_no_grad", "packed")):
        return sparse_expert_ffn(x, w_gate, w_up, w_down, coef, active, act_fn, down_t=down_t, packed=packed)


@pytest.fixture
def large_experts(monkeypatch):
    """Every expert counts as large: calls given packed weights run the packed schedules."""
    monkeypatch.setattr(sparse_ffn, "LARGE_EXPERT", 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", ["views", "cached", "cached_no_grad", "packed", "packed_small"])
def test_sparse_matches_masked_reference(dtype, tokens, pattern, mode, monkeypatch):
    if mode.startswith("packed") and not onednn_runs(dtype):
        pytest.skip(f"oneDNN does not run {dtype} here")
    if mode == "packed":
        monkeypatch.setattr(sparse_ffn, "LARGE_EXPERT", 0)
    mode = mode.removesuffix("_small")  # packed weights given, small experts: the small-expert thresholds
    x, w_gate, w_up, w_down = random_ffn(tokens, dtype=dtype, seed=tokens)
    active = activation_pattern(pattern, tokens, seed=tokens)
    coef = coefficients(active, seed=tokens + 1).to(dtype)
    out = sparse_with(mode, x, w_gate, w_up, w_down, coef, active)
    torch.testing.assert_close(out, masked_expert_ffn(x, w_gate, w_up, w_down, coef, F.silu), **TOLERANCE[dtype])
    assert out[~active.any(1)].eq(0).all()


@pytest.mark.parametrize("tokens", TOKEN_COUNTS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("mode", ["views", "cached_no_grad", "packed", "packed_small"])
def test_bfloat16_paths_match_the_float64_reference(tokens, pattern, mode, monkeypatch):
    if mode.startswith("packed") and not onednn_runs(torch.bfloat16):
        pytest.skip("oneDNN does not run bfloat16 on this CPU")
    if mode == "packed":
        monkeypatch.setattr(sparse_ffn, "LARGE_EXPERT", 0)
    mode = mode.removesuffix("_small")
    x, w_gate, w_up, w_down = random_ffn(tokens, d=64, D=256, seed=tokens)
    active = activation_pattern(pattern, tokens, seed=tokens)
    coef = coefficients(active, seed=tokens + 1)
    low = [t.bfloat16() for t in (x, w_gate, w_up, w_down, coef)]
    expected = masked_expert_ffn(*(t.double() for t in low), F.silu)  # the bf16 inputs, exactly
    out = sparse_with(mode, *low, active)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.bfloat16])


@needs_onednn
@pytest.mark.parametrize("tokens", [1, 30, 200])
@pytest.mark.parametrize("act_fn", [F.gelu, torch.nn.SiLU(), torch.tanh])
@pytest.mark.parametrize("expert_size", ["small", "large"])  # stacked [W_i; U_i], or fused epilogues
def test_packed_path_with_other_activations(tokens, act_fn, expert_size, monkeypatch):
    if expert_size == "large":
        monkeypatch.setattr(sparse_ffn, "LARGE_EXPERT", 0)
    x, w_gate, w_up, w_down = random_ffn(tokens, dtype=torch.float32, seed=11)
    active = activation_pattern("half", tokens, seed=11)
    coef = coefficients(active, seed=12).float()
    out = sparse_with("packed", x, w_gate, w_up, w_down, coef, active, act_fn)
    torch.testing.assert_close(out, masked_expert_ffn(x, w_gate, w_up, w_down, coef, act_fn), **TOLERANCE[torch.float32])


@needs_onednn
@pytest.mark.parametrize("expert_size", ["small", "large"])
def test_packed_path_over_many_fresh_routings(expert_size, monkeypatch):
    """Fresh random inputs and routings (so fresh per-expert row counts and schedules) against the reference."""
    if expert_size == "large":
        monkeypatch.setattr(sparse_ffn, "LARGE_EXPERT", 0)
    generator = torch.Generator().manual_seed(13)
    x, w_gate, w_up, w_down = random_ffn(200, dtype=torch.float32, seed=13)
    packed = pack_expert_weights(w_gate, w_up, w_down, 8)
    for _ in range(30):
        tokens = int(torch.randint(1, 300, (1,), generator=generator))
        share = float(torch.rand(1, generator=generator))
        active = torch.rand(tokens, 8, generator=generator) < share
        coef = (torch.rand(tokens, 8, generator=generator) * 2).float()
        xt = torch.randn(tokens, 24, generator=generator)
        with torch.no_grad():
            out = sparse_expert_ffn(xt, w_gate, w_up, w_down, coef, active, F.silu, packed=packed)
        torch.testing.assert_close(out, masked_expert_ffn(xt, w_gate, w_up, w_down, coef * active, F.silu),
                                   **TOLERANCE[torch.float32])


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
        cached = layer._expert_weights(hidden)
        assert cached is layer._expert_weights(hidden)  # built once
        layer.down_proj.weight.mul_(-2.0)  # in place, as an optimizer step or load_state_dict does
        torch.testing.assert_close(layer(hidden), layer_reference(layer, hidden))
        layer.down_proj.weight = torch.nn.Parameter(torch.randn(32, 64))  # replaced
        torch.testing.assert_close(layer(hidden), layer_reference(layer, hidden))
        layer.double()  # moved
        torch.testing.assert_close(layer(hidden.double()), layer_reference(layer, hidden.double()))
    layer.train()
    assert layer._expert_cache is None


def test_layer_cache_adds_no_checkpoint_entries():
    layer = tiny_layer()
    keys = set(layer.state_dict())
    with torch.no_grad():
        layer(torch.randn(1, 20, 32))
    assert layer._expert_cache is not None
    assert set(layer.state_dict()) == keys == {"gate_proj.weight", "up_proj.weight", "down_proj.weight", "gate.weight"}


def test_layer_in_eval_mode_with_gradients_skips_the_cache():
    layer = tiny_layer()
    hidden = torch.randn(1, 20, 32)
    layer(hidden).sum().backward()
    assert layer._expert_cache is None and layer.down_proj.weight.grad is not None
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


@needs_onednn
@pytest.mark.parametrize("tokens", [1, 40])
def test_layer_packs_its_experts_once_and_matches_the_unpacked_layer(tokens, large_experts):
    layer, hidden = tiny_layer(), torch.randn(2, tokens, 32)
    with torch.no_grad():
        out = layer(hidden)
        down_t, packed = layer._expert_weights(hidden)
        assert down_t is None and len(packed) == 8 and layer._expert_weights(hidden)[1] is packed
        layer.pack_experts = False
        unpacked = layer(hidden)
        assert layer._expert_weights(hidden)[1] is None
    torch.testing.assert_close(out, unpacked, **TOLERANCE[torch.float32])
    torch.testing.assert_close(out, layer_reference(layer, hidden), **TOLERANCE[torch.float32])


def test_schedule_thresholds():
    small, large = 192 * 576, 1024 * 2048  # SmolLM2's and LLaMA-1B's expert matrices
    assert [sparse_ffn.schedule(t, large, torch.float32, True) for t in (1, 64, 2048)] == ["packed"] * 3
    assert [sparse_ffn.schedule(t, large, torch.bfloat16, True) for t in (1, 2, 64)] == ["packed"] * 3
    assert [sparse_ffn.schedule(t, small, torch.float32, True) for t in (1, 8, 512)] == ["packed"] * 3
    assert [sparse_ffn.schedule(t, small, torch.bfloat16, True) for t in (1, 2, 96, 97)] == \
        ["packed", "masked", "masked", "packed"]
    assert [sparse_ffn.schedule(t, large, dtype, False) for t, dtype in ((1, torch.float32), (2, torch.float64))] == \
        ["union", "grouped"]
    assert sparse_ffn.schedule(2, small, torch.bfloat16, False, grouped_mm=True) == "grouped_mm"


@pytest.mark.skipif(not onednn_runs(torch.bfloat16), reason="oneDNN does not run bfloat16 on this CPU")
def test_layer_under_bf16_autocast_packs_bf16_experts():
    layer, hidden = tiny_layer(), torch.randn(2, 30, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(hidden)
        assert layer._expert_weights(hidden)[1][0][0].dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer_reference(layer, hidden), **TOLERANCE[torch.bfloat16])


def test_layer_with_cached_experts_deep_copies_and_pickles():
    import copy
    import pickle

    layer, hidden = tiny_layer(), torch.randn(1, 20, 32)
    with torch.no_grad():
        expected = layer(hidden)
        assert layer._expert_cache is not None
        for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert clone._expert_cache is None
            torch.testing.assert_close(clone(hidden), expected)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("tokens", [2, 5, 50])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_grouped_mm_schedule_matches_the_float64_reference(tokens, pattern, monkeypatch):
    """The CUDA schedule's code through torch's CPU fallback of _grouped_mm (bf16, as on Hopper)."""
    monkeypatch.setattr(sparse_ffn, "GROUPED_MM_DEVICES", {"cpu"})
    x, w_gate, w_up, w_down = random_ffn(tokens, d=64, D=256, seed=tokens + 20)
    active = activation_pattern(pattern, tokens, seed=tokens)
    low = [t.bfloat16() for t in (x, w_gate, w_up, w_down, coefficients(active, seed=tokens + 2))]
    assert sparse_ffn.schedule(tokens, 32 * 64, torch.bfloat16, False, sparse_ffn.grouped_mm_runs(low[0])) == "grouped_mm"
    with torch.no_grad():
        out = sparse_expert_ffn(*low[:4], low[4], active, F.silu, down_t=expert_down_weights(low[3], 8))
    expected = masked_expert_ffn(*(t.double() for t in low), F.silu)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.bfloat16])


def test_schedules_benchmark_runs_every_schedule(tmp_path):
    """benchmarks/schedules.py (the measurements behind `schedule`) on a tiny shape: every schedule timed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "schedules.py"
    command = [sys.executable, str(script), "--dtype", "float32", "--tokens", "1", "5", "--hidden", "32",
               "--intermediate", "64", "--layers", "2", "--rounds", "1", "--out", str(tmp_path / "schedules")]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads((tmp_path / "schedules.json").read_text())["rows"]
    assert [row["T"] for row in rows] == [1, 5]
    expected = {"union", "grouped", "masked"} | ({"packed"} if onednn_runs(torch.float32) else set())
    assert all(row[f"{name}/dense"] > 0 for row in rows for name in expected)
    assert {row["schedule()"] for row in rows} <= expected

"""The CUDA sparse schedule's choices (dsmoe/model/sparse_ffn.py): grouped_mm on compute capability 9.0/10.0,
the masked schedule on other CUDA GPUs, no GEMM for a call with no active (token, expert) pair. On the CPU
through the probes (the device list and the capability patched, torch's CPU fallback of _grouped_mm);
on a GPU (`pytest -m gpu`) against the masked reference."""

import pytest
import torch
import torch.nn.functional as F

from dsmoe.model import sparse_ffn
from dsmoe.model.sparse_ffn import expert_down_weights, masked_expert_ffn, sparse_expert_ffn
from test_sparse_ffn import TOLERANCE, activation_pattern, coefficients, random_ffn

needs_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")


def bf16_case(tokens, pattern, device="cpu"):
    x, w_gate, w_up, w_down = random_ffn(tokens, d=64, D=256, seed=tokens + 30)
    active = activation_pattern(pattern, tokens, seed=tokens)
    low = [t.to(device, torch.bfloat16) for t in (x, w_gate, w_up, w_down, coefficients(active, seed=tokens + 3))]
    return low, active.to(device)


def run(low, active):
    with torch.no_grad():
        return sparse_expert_ffn(*low[:4], low[4], active, F.silu, down_t=expert_down_weights(low[3], 8))


def reference(low):
    return masked_expert_ffn(*(t.double() for t in low), F.silu)


@pytest.fixture
def calls(monkeypatch):
    """The CPU as a CUDA-like device with capability `capability`; counts the schedules' kernels."""
    counted = {"grouped_mm": 0, "masked": 0}
    grouped_mm, masked = getattr(torch, "_grouped_mm", None), sparse_ffn.masked_expert_ffn

    def counting_grouped_mm(*args, **kwargs):
        counted["grouped_mm"] += 1
        return grouped_mm(*args, **kwargs)

    def counting_masked(*args, **kwargs):
        counted["masked"] += 1
        return masked(*args, **kwargs)

    monkeypatch.setattr(sparse_ffn, "GROUPED_MM_DEVICES", {"cpu"})
    monkeypatch.setattr(sparse_ffn, "masked_expert_ffn", counting_masked)
    if grouped_mm is not None:
        monkeypatch.setattr(torch, "_grouped_mm", counting_grouped_mm)

    def with_capability(capability):
        monkeypatch.setattr(sparse_ffn, "device_capability", lambda device: capability)
        return counted
    return with_capability


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (12, 0)])
def test_a_gpu_without_the_grouped_mm_kernel_takes_the_masked_schedule(calls, capability):
    counted = calls(capability)
    low, active = bf16_case(50, "quarter")
    assert sparse_ffn.cuda_schedule(low[0]) == "masked"
    out = run(low, active)
    assert counted == {"grouped_mm": 0, "masked": 1}
    torch.testing.assert_close(out.double(), reference(low), **TOLERANCE[torch.bfloat16])


@needs_grouped_mm
@pytest.mark.parametrize("capability", [(9, 0), (10, 0)])
def test_hopper_and_blackwell_take_grouped_mm(calls, capability):
    counted = calls(capability)
    low, active = bf16_case(50, "half")
    out = run(low, active)
    assert counted == {"grouped_mm": 3, "masked": 0}
    torch.testing.assert_close(out.double(), reference(low), **TOLERANCE[torch.bfloat16])


@needs_grouped_mm
def test_grouped_mm_with_no_active_pair_runs_no_gemm(calls):
    counted = calls((9, 0))
    low, active = bf16_case(40, "all_off")  # τ near 1 in the no-G sweep: no expert on any token
    out = run(low, active)
    assert counted["grouped_mm"] == 0 and torch.equal(out, torch.zeros_like(out))


def test_one_token_keeps_the_union_schedule_on_any_gpu(calls):
    calls((8, 0))
    low, _ = bf16_case(1, "quarter")
    assert sparse_ffn.schedule(1, 32 * 64, torch.bfloat16, False, sparse_ffn.cuda_schedule(low[0])) == "union"


def test_fp32_on_a_gpu_is_not_affected(calls):
    calls((8, 0))
    assert sparse_ffn.cuda_schedule(torch.zeros(4, 8)) is False


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [2, 64, 2048])
@pytest.mark.parametrize("pattern", ["quarter", "half", "all_on", "all_off", "one_expert"])
def test_cuda_schedule_matches_the_masked_reference(tokens, pattern):
    low, active = bf16_case(tokens, pattern, device="cuda")
    expected = reference(low)
    out = run(low, active)
    assert out.is_cuda and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[torch.bfloat16])
    print(f"capability {torch.cuda.get_device_capability()}: {sparse_ffn.cuda_schedule(low[0])}")

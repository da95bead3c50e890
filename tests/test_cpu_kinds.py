"""Every CPU-dependent choice (dsmoe/cpu.py), for each kind of CPU the project runs on: on the CPU at
hand, and on the others by patching torch's feature probes (the choice) or by DSMOE_CPU_KIND (the
path that choice runs, for the kinds this CPU can act as)."""

import pytest
import torch

from dsmoe import cpu
from dsmoe.model.sparse_ffn import onednn_runs
from dsmoe.train.trainer import resolve_mixed_precision
from test_bf16 import BF16_TOL, masked_reference, tiny_layer

# kind: (torch's probes, what `mixed_precision: auto` picks, whether oneDNN runs the bf16 sparse FFN)
KINDS = {
    "avx2": (dict(amx=False, avx512_bf16=False, avx512=False, mkldnn_bf16=False), "no", False),
    "avx512": (dict(amx=False, avx512_bf16=False, avx512=True, mkldnn_bf16=True), "no", True),
    "avx512_bf16": (dict(amx=False, avx512_bf16=True, avx512=True, mkldnn_bf16=True), "no", True),
    "amx": (dict(amx=True, avx512_bf16=True, avx512=True, mkldnn_bf16=True), "bf16", True),
}
HERE = cpu.detected_kind()


def act_as(monkeypatch, probes):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("amx", "avx512_bf16", "avx512"):
        probe = "_is_amx_tile_supported" if name == "amx" else f"_is_{name}_supported"
        monkeypatch.setattr(torch.cpu, probe, lambda value=probes[name]: value)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: probes["mkldnn_bf16"])


@pytest.mark.parametrize("kind", KINDS)
def test_choices_follow_the_probed_cpu_kind(kind, monkeypatch):
    probes, precision, onednn_bf16 = KINDS[kind]
    act_as(monkeypatch, probes)
    assert cpu.detected_kind() == cpu.cpu_kind() == kind
    assert resolve_mixed_precision("auto") == precision
    assert resolve_mixed_precision("no") == "no" and resolve_mixed_precision("bf16") == "bf16"
    assert onednn_runs(torch.bfloat16) is onednn_bf16
    assert onednn_runs(torch.float32) == (torch.backends.mkldnn.is_available())


def test_the_cpu_at_hand_is_one_of_the_kinds():
    assert HERE in cpu.KINDS
    assert cpu.cpu_kind() in cpu.KINDS[:cpu.KINDS.index(HERE) + 1]  # DSMOE_CPU_KIND may lower it


@pytest.mark.parametrize("kind", cpu.KINDS)
def test_dsmoe_cpu_kind_acts_as_a_slower_kind_and_refuses_a_faster_one(kind, monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, kind)
    if cpu.KINDS.index(kind) > cpu.KINDS.index(HERE):
        with pytest.raises(ValueError, match=f"instructions this CPU \\({HERE}\\) lacks"):
            cpu.cpu_kind()
        return
    _, precision, onednn_bf16 = KINDS[kind]
    assert cpu.cpu_kind() == kind
    if not torch.cuda.is_available():
        assert resolve_mixed_precision("auto") == precision
    assert onednn_runs(torch.bfloat16) is (onednn_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_an_unknown_cpu_kind_is_refused(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "avx1024")
    with pytest.raises(ValueError, match="not a CPU kind: choose one of avx2, avx512, avx512_bf16, amx"):
        cpu.cpu_kind()


@pytest.mark.parametrize("kind", cpu.KINDS)
@pytest.mark.parametrize("tokens", [1, 40])
def test_bf16_sparse_inference_each_kind_runs_matches_the_masked_reference(kind, tokens, monkeypatch):
    """The bf16 eval path each kind picks (oneDNN packed, or the plain one on AVX2) against Eq. 7 in float64."""
    if cpu.KINDS.index(kind) > cpu.KINDS.index(HERE):
        pytest.skip(f"this CPU ({HERE}) cannot run the {kind} kind's kernels")
    monkeypatch.setenv(cpu.ENV_VAR, kind)
    torch.manual_seed(tokens)
    layer, hidden = tiny_layer().bfloat16(), torch.randn(2, tokens, 32).bfloat16()
    with torch.no_grad():
        out = layer(hidden)
    assert 0 < layer.last_active.float().mean() < 1, "the routing opened no or every expert: nothing to check"
    torch.testing.assert_close(out.reshape(-1, 32).double(), masked_reference(layer, hidden), **BF16_TOL)

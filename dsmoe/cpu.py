"""Which kind of CPU this is: the one probe behind every CPU-dependent choice of the suite.

The kinds, slowest first, as seen on the project's machines (2 cores each):

    avx2         AMD Zen 2: no bf16 instructions; bf16 matmuls about 7x slower than fp32, oneDNN runs no bf16
    avx512       AVX-512 without bf16 instructions: oneDNN runs bf16 by conversion, no faster than fp32
    avx512_bf16  AMD Zen 4: bf16 matmuls about 2.5x fp32
    amx          Xeon with AMX tiles: bf16 matmuls about 4x fp32

The choices that read it: `train.mixed_precision: auto` (bf16 on amx only; dsmoe.train.trainer) and
whether the sparse FFN runs bf16 through oneDNN's packed kernels (dsmoe.model.sparse_ffn.onednn_bf16,
which reads the variable itself: that file imports only torch).

`DSMOE_CPU_KIND=avx2` (or another kind below the detected one) makes those choices as that kind
would: the test suite runs the slower kinds' paths on a faster machine that way. It cannot add
instructions the CPU lacks, so a kind above the detected one is refused.
"""

import os

import torch

KINDS = ("avx2", "avx512", "avx512_bf16", "amx")
ENV_VAR = "DSMOE_CPU_KIND"


def _probe(name):
    return bool(getattr(torch.cpu, name, lambda: False)())


def detected_kind():
    """The kind of this machine's CPU, from torch's own feature probes."""
    if _probe("_is_amx_tile_supported"):
        return "amx"
    if _probe("_is_avx512_bf16_supported"):
        return "avx512_bf16"
    if _probe("_is_avx512_supported"):
        return "avx512"
    return "avx2"


def cpu_kind():
    """The detected kind, or the lower one that DSMOE_CPU_KIND asks the suite to act as."""
    detected = detected_kind()
    asked = os.environ.get(ENV_VAR, "").strip()
    if not asked:
        return detected
    if asked not in KINDS:
        raise ValueError(f"{ENV_VAR}={asked!r} is not a CPU kind: choose one of {', '.join(KINDS)}")
    if KINDS.index(asked) > KINDS.index(detected):
        raise ValueError(f"{ENV_VAR}={asked} asks for instructions this CPU ({detected}) lacks; "
                         f"choose one of {', '.join(KINDS[:KINDS.index(detected) + 1])}")
    return asked


def bf16_is_fast():
    """Whether bf16 autocast beats fp32 enough to be `auto`'s choice: AMX tiles only.

    AVX-512 BF16 (Zen 4) is 2.5x faster too, but `auto` stays fp32 there, the precision the test
    suite's tolerances were set for; `mixed_precision: bf16` turns it on (config/cpu-study.yaml)."""
    return cpu_kind() == "amx"



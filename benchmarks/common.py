"""Shared helpers for the benchmark scripts: devices, interleaved timing, tables and result files."""

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dsmoe.atomic import atomic_file, write_csv

RESULTS = Path(__file__).resolve().parent / "results"


def devices(choice):
    """'auto' -> cpu plus cuda when available; otherwise the one device named."""
    if choice == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return [choice]


def default_dtype(device, name=None):
    """float32 on CPU, bfloat16 on CUDA unless `name` says otherwise."""
    if name:
        return getattr(torch, name)
    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def clock_for(name, device, threads):
    """The timer: wall-clock, or this process's CPU time (only meaningful for 1 CPU thread).

    On a machine shared with other busy processes, CPU time leaves out the time this process
    waits for a core; memory-bandwidth and cache contention still count."""
    if name == "cpu" and (device != "cpu" or threads != 1):
        raise ValueError("--clock cpu needs --device cpu and --threads 1 (CPU time sums all threads)")
    return CLOCKS[name]


def time_side_by_side(candidates, device, repeats=5, warmup=1, budget_s=None, min_round_s=0.05, clock=time.perf_counter,
                      stat="min"):
    """Seconds of one call of each callable in `candidates` (name -> fn): the `stat` ("min" or
    "median") of its timed calls.

    Calls are interleaved round-robin (a, b, c, a, b, c, ...) so that load from other processes
    on a shared machine hits every candidate alike, and the minimum keeps the calls that it did
    not slow. A fast callable runs several times per round (for about `min_round_s`). `clock`:
    time.perf_counter (wall) or time.process_time (CPU time, see `clock_for`).
    `budget_s` stops early after at least 2 rounds. The median suits an idle machine of your own;
    the minimum, one shared with other busy processes.
    """
    number = {}
    for name, fn in candidates.items():
        for _ in range(max(warmup, 1)):  # the last warm-up call also sizes the rounds
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
        number[name] = max(1, min(1000, int(min_round_s / max(clock() - t0, 1e-6))))
    times = {name: [] for name in candidates}
    start = time.perf_counter()
    for round_ in range(repeats):
        for name, fn in candidates.items():
            for _ in range(number[name]):
                synchronize(device)
                t0 = clock()
                fn()
                synchronize(device)
                times[name].append(clock() - t0)
        if budget_s is not None and round_ >= 1 and time.perf_counter() - start > budget_s:
            break
    pick = {"min": min, "median": statistics.median}[stat]
    return {name: pick(values) for name, values in times.items()}


def environment():
    """What the numbers were measured on (written next to every result)."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if hasattr(os, "getloadavg"):
        info["load_average_1min"] = os.getloadavg()[0]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def write_results(df, path, **extra):
    """Write `df` to `path` (.csv) and the rows plus environment to the same name with .json."""
    path = Path(path)
    write_csv(df, path.with_suffix(".csv"))
    payload = {"environment": environment(), **extra, "rows": df.to_dict(orient="records")}
    with atomic_file(path.with_suffix(".json")) as handle:
        json.dump(payload, handle, indent=1, default=str)
    print(f"wrote {path.with_suffix('.csv')} and {path.with_suffix('.json')}")


def check_target(name, value, target):
    """One line saying whether a ratio meets its target (lower is better)."""
    verdict = "meets" if value <= target else "misses"
    return f"{name}: {value:.2f} ({verdict} target <= {target:.2f})"

"""GPU timing for the benchmarks (DESIGN.md section 6 definitions).

device time = sum of GPU kernel time per call (torch.profiler, CUDA activity);
eager time  = wall time per call of back-to-back Python calls, synchronized at the end.
Inputs rotate through several copies so weights come from HBM, not L2.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile


def eager_us(fn, inputs: list, iters: int = 50, warmup: int = 5, repeats: int = 3) -> float:
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(iters):
            fn(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / iters * 1e6)
    return statistics.median(samples)


def device_us(fn, inputs: list, iters: int = 30, warmup: int = 5) -> float:
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(iters):
            fn(*inputs[i % len(inputs)])
        torch.cuda.synchronize()
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    # events() lists each kernel once with its own time; memcpy/memset count too (they are device work)
    return total / iters


def copy_ceiling_tbps() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes), TB/s."""
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 20
    return 2 * n / seconds / 1e12

"""GPU benchmark: one AdamW step on 200M fp32 parameters (4 tensors of 50M) with fp32 grads.

kbitc AdamW8bit (fused CUDA kernel, 2 bytes/param of state) vs bitsandbytes AdamW8bit vs
torch.optim.AdamW(fused=True) (8 bytes/param of state), in one process. Each step is timed with CUDA
events (median of --iters steps after --warmup); the first kbitc step builds the kernels (cached).
Appends a table to bench/RESULTS.md.

    python bench/gpu_optim.py                 # 200M params
    python bench/gpu_optim.py --params 50e6 --no-append
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_results  # noqa: E402


def make_params(total: int, tensors: int, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    each = total // tensors
    params = []
    for _ in range(tensors):
        p = torch.nn.Parameter(torch.randn(each, device="cuda", generator=g) * 0.02)
        p.grad = torch.randn(each, device="cuda", generator=g) * 1e-3
        params.append(p)
    return params


def time_steps(opt, iters: int, warmup: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        opt.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), times


def state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type == "cuda" and value.numel() > 1:
                total += value.numel() * value.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=200e6)
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    total = int(args.params)
    import kbitc.optim as ko

    rows = []
    makers = [("kbitc AdamW8bit", lambda ps: ko.AdamW8bit(ps, lr=1e-4)),
              ("torch AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))]
    try:
        import bitsandbytes as bnb

        makers.insert(1, ("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4)))
        bnb_version = bnb.__version__
    except ImportError:
        bnb_version = "not installed"
    n_elems = (total // args.tensors) * args.tensors
    for name, make in makers:
        params = make_params(total, args.tensors)
        opt = make(params)
        median_ms, times = time_steps(opt, args.iters, args.warmup)
        state = state_bytes(opt)
        # bytes moved per step by a fused 8-bit step: param r/w (8) + grad (4) + 2 codes r/w (4)
        rows.append((name, median_ms, min(times), state / n_elems))
        print(f"{name}: median {median_ms:.3f} ms (min {min(times):.3f}), state {state / n_elems:.2f} B/param")
        del opt, params
        torch.cuda.empty_cache()
    kbitc_ms = rows[0][1]
    lines = ["| optimizer | median ms/step | min ms | state bytes/param | kbitc speedup | GB/s (16 B/param) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, med, best, bpp in rows:
        lines.append(f"| {name} | {med:.3f} | {best:.3f} | {bpp:.2f} | {med / kbitc_ms:.2f}x | "
                     f"{16 * n_elems / med / 1e6:.0f} |")
    table = "\n".join(lines)
    device = torch.cuda.get_device_name()
    title = (f"8-bit AdamW step, {n_elems / 1e6:.0f}M fp32 params in {args.tensors} tensors ({device}, "
             f"torch {torch.__version__}, bitsandbytes {bnb_version}; CUDA events, median of {args.iters})")
    if args.no_append:
        print(table)
    else:
        append_results(title, "python bench/gpu_optim.py " + " ".join(sys.argv[1:]), table)


if __name__ == "__main__":
    main()

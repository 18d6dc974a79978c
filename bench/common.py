"""Shared benchmark helpers: medians, environment line, appending tables to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def median_seconds(fn, repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{datetime.date.today().isoformat()}; CPU {cpu}, {torch.get_num_threads()} threads "
            f"({torch.backends.cpu.get_cpu_capability()}); python {platform.python_version()}, "
            f"torch {torch.__version__}, kbitc {_version('kbitc')}, bitsandbytes {_version('bitsandbytes')}")


def append_results(title: str, command: str, table: str) -> None:
    block = f"\n## {title}\n\n{environment_line()}  \nCommand: `{command}`\n\n{table}\n"
    with RESULTS.open("a") as f:
        f.write(block)
    print(block)

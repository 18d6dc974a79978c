"""Shared benchmark helpers: medians, environment line, appending tables to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
import traceback
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


def run_contender(rows: dict, notes: list, name: str, measure, after=None) -> None:
    """rows[name] = measure(), then after(); a contender that fails is printed and noted, not fatal."""
    try:
        rows[name] = measure()
        if after is not None:
            after()
    except Exception as exc:
        traceback.print_exc()
        notes.append(f"{name} failed: {type(exc).__name__}: {str(exc)[:200]}")


def speed_table(rows: dict, entries, baseline_ms, ratio_header: str, ms_digits: int, tps_digits: int) -> list[str]:
    """Markdown rows of ms/token, tokens/s and ms / baseline_ms for each measured (label, contender, key)."""
    table = [f"| contender | ms/token | tokens/s | {ratio_header} |", "| --- | --- | --- | --- |"]
    for label, name, key in entries:
        ms = rows.get(name, {}).get(key)
        if ms is not None:
            ratio = f"{ms / baseline_ms:.2f}x" if baseline_ms else ""
            table.append(f"| {label} | {ms:.{ms_digits}f} | {1e3 / ms:.{tps_digits}f} | {ratio} |")
    return table

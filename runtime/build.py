"""Build rendered kernel sources into a library with CMake + pybind11, cached by content hash.

The cache lives in the user cache folder (`KBITC_CACHE_DIR` overrides the location only). An entry
is built in a private temporary folder and renamed into place, so concurrent builders never see a
half-written entry and a failed build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from kbitc.runtime.errors import KbitcError

LIBRARY_FILE = "library"  # stem of the built module inside a cache entry


class BuildError(KbitcError):
    """A kernel library failed to build (the compiler's output is in the message)."""


class ToolchainMissingError(BuildError):
    """cmake, a C++ compiler, nvcc or pybind11 is not installed."""


def cache_root() -> Path:
    base = os.environ.get("KBITC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kbitc")
    return Path(base) / "kernels"


def abi_tag(is_cuda: bool) -> dict:
    """What a built module depends on: the CPython ABI (pybind11) and the platform."""
    tag = {"python": sys.implementation.cache_tag, "platform": sysconfig.get_platform()}
    if is_cuda:
        tag["nvcc"] = _tool_version("nvcc")
    return tag


def _tool_version(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        return "missing"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1] if out else "unknown"


def _require_toolchain(is_cuda: bool) -> str:
    missing = [t for t in ("cmake", "c++") if shutil.which(t) is None]
    if is_cuda and shutil.which("nvcc") is None:
        missing.append("nvcc (CUDA toolkit)")
    try:
        import pybind11
    except ImportError:
        missing.append("pybind11 (pip install pybind11)")
        pybind11 = None
    if missing:
        raise ToolchainMissingError(
            f"expected a kernel toolchain, but {', '.join(missing)} is not installed; install it "
            "(Debian: apt-get install cmake g++; CUDA: the CUDA toolkit with nvcc) or load an "
            "artifact whose bundled library matches this machine")
    return pybind11.get_cmake_dir()


def library_key(sources: dict[str, str], is_cuda: bool) -> str:
    digest = hashlib.sha256(repr(sorted(abi_tag(is_cuda).items())).encode())
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    return digest.hexdigest()[:24]


def find_built(entry: Path) -> Path | None:
    hits = sorted(entry.glob(LIBRARY_FILE + "*.so")) if entry.is_dir() else []
    return hits[0] if hits else None


def build_library(module_name: str, sources: dict[str, str], is_cuda: bool, spec_names=(),
                  jobs: int | None = None) -> Path:
    """Path of the built module for these sources, building it on a cache miss."""
    entry = cache_root() / f"{module_name}-{library_key(sources, is_cuda)}"
    built = find_built(entry)
    if built is not None:
        return built
    pybind11_dir = _require_toolchain(is_cuda)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{module_name}-", dir=entry.parent) as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "src"
        src.mkdir()
        for name, text in sources.items():
            (src / name).write_text(text)
        build = tmp_path / "build"
        configure = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                     f"-Dpybind11_DIR={pybind11_dir}", f"-DPython_EXECUTABLE={sys.executable}"]
        if is_cuda:
            configure.append(f"-DCMAKE_CUDA_COMPILER={shutil.which('nvcc')}")
        _run(configure, module_name, spec_names)
        _run(["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2)], module_name, spec_names)
        module = next(build.glob(module_name + "*.so"))
        staged = tmp_path / "entry"
        staged.mkdir()
        shutil.copy2(module, staged / (LIBRARY_FILE + module.name[len(module_name):]))
        for name, text in sources.items():  # keep the sources beside the binary for inspection
            (staged / name).write_text(text)
        try:
            os.rename(staged, entry)
        except OSError:
            if find_built(entry) is None:  # not a lost race: a real failure
                raise
    built = find_built(entry)
    if built is None:
        raise BuildError(f"kernel library {module_name} built but not found in {entry}")
    return built


def _run(cmd: list[str], module_name: str, spec_names) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log = (proc.stdout + proc.stderr)[-6000:]
        specs = ", ".join(spec_names) or module_name
        raise BuildError(f"building kernel library {module_name} failed (specs: {specs}).\n"
                         f"command: {' '.join(cmd)}\n{log}")

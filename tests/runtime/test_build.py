"""The cached CMake + pybind11 build: reuse, the cache location, failures, races, missing tools."""

import multiprocessing
import os
import shutil

import pytest

from kbitc.compiler import codegen
from kbitc.runtime import build
from kbitc.runtime.kernel_spec import KernelSpec

pytestmark = pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                                reason="needs cmake and a C++ compiler")

SPEC = KernelSpec("dequantize_4bit", "cpu_avx2", "f32", "nf4", 64)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KBITC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


def _build(sources=None):
    lib = codegen.render_library([SPEC])
    return build.build_library(lib.module_name, sources or lib.sources, False, [SPEC.name])


def test_build_is_cached_by_content(cache):
    first = _build()
    assert cache in first.parents
    mtime = first.stat().st_mtime_ns
    assert _build() == first and first.stat().st_mtime_ns == mtime  # a hit does not rebuild
    assert [p.name for p in cache.iterdir()] == [first.parent.name]  # no temporary leftovers


def test_failed_build_names_the_spec_shows_the_error_and_leaves_nothing(cache):
    lib = codegen.render_library([SPEC])
    sources = dict(lib.sources)
    sources[SPEC.name + ".cpp"] += "\nthis is not C++;\n"
    with pytest.raises(build.BuildError, match=SPEC.name) as info:
        build.build_library(lib.module_name, sources, False, [SPEC.name])
    assert "error" in str(info.value).lower()
    assert not any(cache.iterdir())


def _build_in_child(cache_dir, queue):
    os.environ["KBITC_CACHE_DIR"] = cache_dir
    queue.put(str(_build()))


def test_two_processes_building_at_once_agree(cache, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "cache"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    paths = {queue.get(timeout=5), queue.get(timeout=5)}
    assert len(paths) == 1 and os.path.exists(paths.pop())
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1


def test_missing_toolchain_is_a_clear_error(cache, monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(build.shutil, "which", lambda tool: None if tool == "cmake" else real_which(tool))
    with pytest.raises(build.ToolchainMissingError, match="cmake.*not installed"):
        _build()
    monkeypatch.setattr(build.shutil, "which", lambda tool: None if tool == "nvcc" else real_which(tool))
    with pytest.raises(build.ToolchainMissingError, match="nvcc"):
        build.build_library("kbitc_sm80_x", {"a.cu": ""}, True)

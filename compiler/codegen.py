"""Codegen: render exactly the kernel specs a model needs from codegen_templates/ (Jinja,
StrictUndefined), plus the pybind11 glue and the CMake file that builds them into one library."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import jinja2

from kbitc.runtime.errors import UnsupportedInputError, expect
from kbitc.runtime.kernel_spec import CPU_TARGETS, KernelSpec

# target -> compiler flags for the CPU ISA it names
CPU_FLAGS = {
    "cpu_avx2": ["-mavx2", "-mfma", "-mf16c"],
    "cpu_avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    # cpu_avx512 plus AVX512_BF16 (vdpbf16ps) and AVX512_VNNI (vpdpwssd / vpdpbusd): Zen 4, Cooper Lake,
    # Sapphire Rapids and later
    "cpu_avx512_bf16": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                        "-mavx512bf16", "-mavx512vnni"],
}
CTYPES_CPU = {"f32": "float", "bf16": "kbitc_bf16", "f16": "kbitc_f16"}
CTYPES_CUDA = {"f32": "float", "bf16": "__nv_bfloat16", "f16": "__half"}


@dataclass(frozen=True)
class RenderedLibrary:
    """Sources of one kernel library, ready for runtime.build: file name -> text."""

    module_name: str
    target: str
    specs: tuple[KernelSpec, ...]
    sources: dict[str, str]


def _environment() -> jinja2.Environment:
    root = resources.files("kbitc.codegen_templates")
    return jinja2.Environment(loader=jinja2.FunctionLoader(lambda name: (root / name).read_text()),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True)


def template_name(spec: KernelSpec) -> str:
    folder = "cpu" if spec.is_cpu else "cuda"
    return f"{folder}/{spec.op}.{'cpp' if spec.is_cpu else 'cu'}.j2"


def render_spec(spec: KernelSpec, env: jinja2.Environment | None = None) -> str:
    env = env or _environment()
    ctype = (CTYPES_CPU if spec.is_cpu else CTYPES_CUDA)[spec.dtype]
    variables = {"spec": spec, "ctype": ctype}
    if not spec.is_cpu:
        variables["arch"] = spec.target.removeprefix("sm")
    try:
        return env.get_template(template_name(spec)).render(**variables)
    except jinja2.TemplateNotFound as exc:
        raise UnsupportedInputError(f"no template {template_name(spec)} for kernel {spec.name}") from exc


def render_library(specs: list[KernelSpec]) -> RenderedLibrary:
    """Render `specs` (one target) into the sources of one library, named by their content hash."""
    expect(bool(specs), UnsupportedInputError, "expected at least one kernel spec to render")
    targets = {s.target for s in specs}
    expect(len(targets) == 1, UnsupportedInputError,
           f"expected kernel specs of one target per library, got {sorted(targets)}")
    target = targets.pop()
    specs = sorted(set(specs), key=lambda s: s.name)
    env = _environment()
    is_cpu = target in CPU_TARGETS
    ext = "cpp" if is_cpu else "cu"
    sources = {"kbitc_abi.h": env.get_template("common/kbitc_abi.h.j2").render()}
    helper = "cpu/kbitc_cpu.h" if is_cpu else "cuda/kbitc_cuda.cuh"
    sources[helper.split("/")[1]] = env.get_template(helper + ".j2").render()
    for spec in specs:
        sources[f"{spec.name}.{ext}"] = render_spec(spec, env)
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + sources[name].encode() + b"\0")
    module_name = f"kbitc_{target}_{digest.hexdigest()[:16]}"
    sources["module.cpp"] = env.get_template("common/module.cpp.j2").render(module_name=module_name, specs=specs)
    kernel_files = sorted(n for n in sources if n.endswith((".cpp", ".cu")))
    sources["CMakeLists.txt"] = env.get_template("common/CMakeLists.txt.j2").render(
        module_name=module_name, sources=kernel_files,
        cuda_arch="" if is_cpu else target.removeprefix("sm"), cpu_flags=CPU_FLAGS.get(target, []))
    return RenderedLibrary(module_name, target, tuple(specs), sources)


def main(argv: list[str] | None = None) -> None:
    """Render every op's kernels for a target into a folder, to read them or build them by hand:
    python -m kbitc.compiler.codegen --target cpu_avx2 --out build/kernels
    cmake -S . -B build/cmake -DKBITC_RENDERED_DIR=build/kernels && cmake --build build/cmake"""
    import argparse
    from pathlib import Path

    from kbitc.compiler.kernels import all_specs

    parser = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="cpu_avx2, cpu_avx512, cpu_avx512_bf16, sm75 ... sm90")
    parser.add_argument("--dtype", action="append", help="activation dtype (repeatable); default f32/bf16 on CPU, f16/bf16 on CUDA")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    dtypes = tuple(args.dtype or (("f32", "bf16") if args.target.startswith("cpu") else ("f16", "bf16")))
    lib = render_library(all_specs(args.target, dtypes))
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in lib.sources.items():
        (args.out / name).write_text(text)
    print(f"rendered {len(lib.specs)} kernels of {lib.module_name} into {args.out}")


if __name__ == "__main__":
    main()

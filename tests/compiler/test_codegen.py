"""Codegen: deterministic spec names, StrictUndefined templates, exactly the requested specs."""

import jinja2
import pytest

from kbitc.compiler import codegen
from kbitc.runtime.errors import UnsupportedInputError
from kbitc.runtime.kernel_spec import KernelSpec


def test_spec_names_are_procedural_and_round_trip():
    spec = KernelSpec("linear_4bit", "sm80", "bf16", "nf4", 64, (("tm", 128),))
    assert spec.name == "kbitc_sm80_nf4_linear_bf16_b64_tm128"
    assert KernelSpec("int8_linear", "cpu_avx512", "f32").name == "kbitc_cpu_avx512_int8_linear_f32"
    assert KernelSpec("quantize_blockwise", "sm90", "f32", blocksize=256).name == "kbitc_sm90_q8_quantize_f32_b256"
    assert KernelSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(op="matmul", target="sm80", dtype="f16"), "kernel op"),
    (dict(op="linear_4bit", target="sm70", dtype="f16", quant_type="nf4", blocksize=64), "target"),
    (dict(op="linear_4bit", target="cpu_avx2", dtype="f16", quant_type="nf4", blocksize=64), "dtype"),
    (dict(op="linear_4bit", target="sm80", dtype="f16", blocksize=64), "needs quant_type"),
    (dict(op="int8_quant", target="sm80", dtype="f16", blocksize=64), "takes no blocksize"),
])
def test_invalid_specs_are_rejected(kwargs, pattern):
    with pytest.raises(UnsupportedInputError, match=pattern):
        KernelSpec(**kwargs)


def test_render_library_renders_exactly_the_requested_specs():
    specs = [KernelSpec("dequantize_4bit", "cpu_avx2", "f32", "nf4", 64),
             KernelSpec("dequantize_4bit", "cpu_avx2", "bf16", "fp4", 128)]
    lib = codegen.render_library(specs + specs[:1])  # duplicates collapse
    kernel_files = sorted(n for n in lib.sources if n.endswith(".cpp") and n != "module.cpp")
    assert kernel_files == sorted(s.name + ".cpp" for s in specs)
    for spec in specs:
        assert f"int {spec.name}(const kbitc_args* a)" in lib.sources[spec.name + ".cpp"]
        assert f'm.def("{spec.name}"' in lib.sources["module.cpp"]
    assert lib.module_name in lib.sources["CMakeLists.txt"]
    # deterministic: same specs, same module name; different specs, different name
    assert codegen.render_library(list(reversed(specs))).module_name == lib.module_name
    assert codegen.render_library(specs[:1]).module_name != lib.module_name


def test_one_target_per_library():
    with pytest.raises(UnsupportedInputError, match="one target"):
        codegen.render_library([KernelSpec("dequantize_4bit", "cpu_avx2", "f32", "nf4", 64),
                                KernelSpec("dequantize_4bit", "cpu_avx512", "f32", "nf4", 64)])


def test_templates_are_strict_about_undefined_variables():
    env = codegen._environment()
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("cpu/dequantize_4bit.cpp.j2").render(ctype="float")  # no `spec`

"""CUDA kernels: compiled with nvcc for sm75/sm80/sm90 everywhere (CI has nvcc but no GPU), and
checked against the reference on a real GPU when one is present (skipped otherwise)."""

import pytest
import torch

from kbitc.compiler.kernels import build_kernels
from kbitc.runtime.kernel_spec import KernelSpec
from tests.runtime import kernel_checks as checks

needs_nvcc, needs_gpu = checks.needs_nvcc, checks.needs_gpu

CASES_4BIT = [("nf4", 64), ("fp4", 64), ("nf4", 4096)]
ACT_DTYPES = ("f16", "bf16")


def cuda_specs(target, dtypes=ACT_DTYPES, cases=CASES_4BIT):
    specs = []
    for dtype in dtypes:
        for qt, bs in cases:
            specs += [KernelSpec(op, target, dtype, qt, bs) for op in ("dequantize_4bit", "linear_4bit", "quantize_4bit")]
        specs += [KernelSpec(op, target, dtype, "", 256) for op in ("quantize_blockwise", "dequantize_blockwise")]
        specs += [KernelSpec(op, target, dtype) for op in ("int8_quant", "int8_linear")]
    specs += [KernelSpec("quantize_4bit", target, "f32", "nf4", 64),
              KernelSpec("quantize_blockwise", target, "f32", "", 256),
              KernelSpec("dequantize_blockwise", target, "f32", "", 256)]
    return specs


@needs_nvcc
@pytest.mark.parametrize("target", ["sm75", "sm80", "sm90"])
def test_cuda_kernels_compile(target):
    """Every op renders and compiles for the target (a broken template fails here, without a GPU)."""
    library_specs = cuda_specs(target, cases=[("nf4", 64), ("fp4", 4096)])
    library = build_kernels(library_specs, register=False)
    assert set(library.specs) == {s.name for s in library_specs}


@pytest.fixture(scope="module")
def gpu_target():
    major, minor = torch.cuda.get_device_capability()
    target = f"sm{major}{minor}"
    with checks.only_kernels(cuda_specs(target)):
        yield target


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_4bit_kernels_on_gpu(gpu_target, dtype, quant_type, blocksize, rng):
    tdtype = checks.TORCH_DTYPES[dtype]
    for op in ("dequantize_4bit", "linear_4bit", "quantize_4bit"):
        checks.assert_kernel_used(op, "cuda", tdtype, quant_type, blocksize)
    checks.check_dequantize_4bit("cuda", tdtype, quant_type, blocksize, rng)
    checks.check_linear_4bit("cuda", tdtype, quant_type, blocksize, rng, ms=(1, 3, 8, 9, 12, 17, 32, 33, 64, 300))
    checks.check_quantize_4bit("cuda", tdtype, quant_type, blocksize, rng)


# The GEMV warps-per-block table of linear_4bit.cu.j2 (sm90): each tuned shape at both ends of its M range.
TUNED_GEMV = [(11008, 4096, 1), (11008, 4096, 32), (4096, 4096, 17), (14336, 4096, 9), (2048, 2048, 8),
              (5632, 2048, 20), (2048, 5632, 1), (2048, 5632, 16)]


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("n,k,m", TUNED_GEMV)
def test_tuned_gemv_shapes_on_gpu(gpu_target, n, k, m, rng):
    import kbitc.quant as kq
    from kbitc.runtime import ops, reference
    from kbitc.runtime.reference import quant_state_args

    w = torch.randn(n, k, generator=rng) * 0.05
    packed, state = kq.quantize_4bit(w, "nf4", 64, double_quant=True)
    qargs = quant_state_args(state)
    x = torch.randn(m, k, generator=rng).bfloat16()
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in qargs]
    out = ops.linear_4bit(x.cuda(), packed.cuda(), *dev, None, "nf4", 64, n)
    checks.assert_close_to(out.cpu(), reference.linear_4bit(x, packed, *qargs, None, 64, n), torch.bfloat16)


# M = 1 shapes that take linear_4bit's gemv1 (k-stationary warps): ceil(n / 8) blocks x ceil(k / 1024)
# warps >= 8 per SM on GPUs of up to 150 SMs; n % 8 == 1 leaves a block with one row, and k % 1024 == 32
# a last warp with one lane in range. Blocksize 4096 blocks cross rows (k = 4128).
GEMV1_SHAPES = [(2049, 4128), (9601, 1056)]


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("n,k", GEMV1_SHAPES)
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_gemv1_on_gpu(gpu_target, n, k, dtype, quant_type, blocksize, rng):
    import kbitc.quant as kq
    from kbitc.runtime import ops, reference
    from kbitc.runtime.reference import quant_state_args

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert -(-n // 8) * -(-k // 1024) >= 8 * sms  # the case under test (linear_4bit.cu.j2's gemv1 rule)
    tdtype = checks.TORCH_DTYPES[dtype]
    w = torch.randn(n, k, generator=rng) * 0.05
    w[n // 2, 7] = 3.0  # a large outlier: its block's scale
    packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=quant_type == "nf4")
    qargs = quant_state_args(state)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in qargs]
    x = torch.randn(1, k, generator=rng).to(tdtype)
    for bias in (None, torch.randn(n, generator=rng).to(tdtype)):
        out = ops.linear_4bit(x.cuda(), packed.cuda(), *dev, None if bias is None else bias.cuda(), quant_type,
                              blocksize, n)
        checks.assert_close_to(out.cpu(), reference.linear_4bit(x, packed, *qargs, bias, blocksize, n), tdtype)


# Shapes of the sm90 warpgroup (wgmma) GEMM (K % 64 == 0, M > 32): n not a multiple of the 128-row
# tile, token counts around the 64 / 128 tile widths, and M = 1000 (past ops.py's dequantize + cuBLAS
# threshold, forced through the fused kernel here). 4096 x 4096 at M = 100 splits K.
WGMMA_SHAPES = [(130, 192, (33, 64, 65, 128, 129, 1000)), (1000, 1024, (40, 200)), (4096, 4096, (100,))]


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_wgmma_gemm_on_gpu(gpu_target, dtype, quant_type, blocksize, rng, monkeypatch):
    import kbitc.quant as kq
    from kbitc.runtime import ops, reference
    from kbitc.runtime.reference import quant_state_args

    if gpu_target != "sm90":
        pytest.skip("the wgmma GEMM is the sm90 path; this GPU is " + gpu_target)
    monkeypatch.setattr(ops, "CUDA_DEQUANT_GEMM_MIN_ROWS", 1 << 30)  # always the fused kernel
    monkeypatch.setattr(ops, "CUDA_DEQUANT_GEMM_MIN_ROWS_SM90", 1 << 30)
    tdtype = checks.TORCH_DTYPES[dtype]
    for n, k, ms in WGMMA_SHAPES:
        w = torch.randn(n, k, generator=rng) * 0.05
        w[n // 2, 7] = 3.0  # a large outlier: its block's scale
        packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=quant_type == "nf4")
        qargs = quant_state_args(state)
        dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in qargs]
        for m in ms:
            x = torch.randn(m, k, generator=rng).to(tdtype)
            x[0, 3] = 40.0  # an activation outlier
            bias = torch.randn(n, generator=rng).to(tdtype) if m % 2 else None
            out = ops.linear_4bit(x.cuda(), packed.cuda(), *dev, None if bias is None else bias.cuda(), quant_type,
                                  blocksize, n)
            checks.assert_close_to(out.cpu(), reference.linear_4bit(x, packed, *qargs, bias, blocksize, n), tdtype)


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", ACT_DTYPES + ("f32",))
def test_8bit_and_int8_kernels_on_gpu(gpu_target, dtype, rng):
    tdtype = checks.TORCH_DTYPES[dtype]
    checks.check_blockwise("cuda", tdtype, 256, rng)
    if dtype != "f32":
        checks.assert_kernel_used("int8_linear", "cuda", tdtype)
        checks.check_int8("cuda", tdtype, rng, ms=(1, 3, 17, 64, 300))
    else:
        checks.check_quantize_4bit("cuda", tdtype, "nf4", 64, rng)


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("m", [33, 100, 255])
def test_split_k_gemm_on_gpu(gpu_target, m, rng):
    """M = 33..255 with few output tiles: K is split over blocks (runtime/ops.py _gemm_k_splits);
    the float32 partials summed in split order stay within the output dtype's rounding of the
    reference, with and without a bias, and K % 128 != 0 leaves a short last step."""
    import kbitc.quant as kq
    from kbitc.runtime import ops, reference
    from kbitc.runtime.reference import quant_state_args

    n, k = 264, 4160
    w = torch.randn(n, k, generator=rng) * 0.05
    packed, state = kq.quantize_4bit(w, "nf4", 64, double_quant=True)
    qargs = quant_state_args(state)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in qargs]
    x = torch.randn(m, k, generator=rng).bfloat16()
    rows = x.cuda()
    assert ops._gemm_k_splits(rows, n) > 1  # the case under test
    for bias in (None, torch.randn(n, generator=rng).bfloat16()):
        out = ops.linear_4bit(rows, packed.cuda(), *dev, None if bias is None else bias.cuda(), "nf4", 64, n)
        checks.assert_close_to(out.cpu(), reference.linear_4bit(x, packed, *qargs, bias, 64, n), torch.bfloat16)


# M <= 32 through the tiled GEMM with 16 / 32-row x tiles and K split over blocks (linear_4bit.cu.j2
# small_m_takes_gemm: M = 17..32 from 4096 outputs, M = 9..16 from 8192). n % 128 == 1 leaves a last
# tile of one row, k % 128 == 64 a short last step; blocksize 4096 blocks cross rows.
@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("n,ms", [(4097, (17, 32)), (8193, (9, 16))])
@pytest.mark.parametrize("dtype", ACT_DTYPES)
@pytest.mark.parametrize("quant_type,blocksize", CASES_4BIT)
def test_small_m_gemm_on_gpu(gpu_target, n, ms, dtype, quant_type, blocksize, rng):
    import kbitc.quant as kq
    from kbitc.runtime import ops, reference
    from kbitc.runtime.reference import quant_state_args

    k = 4160
    tdtype = checks.TORCH_DTYPES[dtype]
    w = torch.randn(n, k, generator=rng) * 0.05
    w[n - 1, 100] = 4.0  # a large outlier in the last tile's only row
    packed, state = kq.quantize_4bit(w, quant_type, blocksize, double_quant=quant_type == "nf4")
    qargs = quant_state_args(state)
    dev = [t.cuda() if isinstance(t, torch.Tensor) else t for t in qargs]
    for m in ms:
        x = torch.randn(m, k, generator=rng).to(tdtype)
        assert ops._gemm_k_splits(x.cuda(), n) > 1  # the case under test
        bias = torch.randn(n, generator=rng).to(tdtype) if m % 2 else None
        out = ops.linear_4bit(x.cuda(), packed.cuda(), *dev, None if bias is None else bias.cuda(), quant_type,
                              blocksize, n)
        checks.assert_close_to(out.cpu(), reference.linear_4bit(x, packed, *qargs, bias, blocksize, n), tdtype)


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_int8_cublas_route_gives_the_kernels_bits(gpu_target, dtype, rng, monkeypatch):
    """M > 16: int8_quant + cuBLASLt's int32 product + the epilogue equals the all-kernel route bit
    for bit (exact int32 sums, float32 outlier sums in the same order)."""
    import kbitc.quant as kq
    from kbitc.runtime import ops

    tdtype = checks.TORCH_DTYPES[dtype]
    x = torch.randn(300, 4160, generator=rng)
    x[:, [3, 700, 4100]] *= 40.0  # outlier columns in both 4096-column chunks of the epilogue
    x = x.to(tdtype).cuda()
    w, scb = [t.cuda() for t in kq.int8_vectorwise_quant(torch.randn(264, 4160, generator=rng))]
    bias = torch.randn(264, generator=rng).to(tdtype).cuda()
    routed = ops.int8_linear(x, w, scb, bias, 6.0)
    monkeypatch.setattr(ops, "CUDA_INT_MM_MIN_ROWS", 1 << 30)
    kernel_only = ops.int8_linear(x, w, scb, bias, 6.0)
    assert torch.equal(routed, kernel_only)


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("m", [1, 5, 8])
def test_int8_fused_gemv_gives_the_unfused_bits(gpu_target, m, rng):
    """M <= 8: the one-launch GEMV (x quantized per block in shared memory) equals int8_quant +
    int8_gemv, which an input misaligned by one element still takes, bit for bit."""
    import kbitc.quant as kq
    from kbitc.runtime import ops

    k = 1040  # two full 512-column warp steps and a partial one
    x = torch.randn(m, k, generator=rng)
    x[:, [7, 600, 1039]] *= 30.0  # outlier columns
    x = x.bfloat16().cuda()
    w, scb = [t.cuda() for t in kq.int8_vectorwise_quant(torch.randn(264, k, generator=rng))]
    bias = torch.randn(264, generator=rng).bfloat16().cuda()
    fused = ops.int8_linear(x, w, scb, bias, 6.0)
    misaligned = torch.empty(m * k + 1, dtype=x.dtype, device="cuda")[1:].view(m, k)
    misaligned.copy_(x)
    assert misaligned.is_contiguous() and misaligned.data_ptr() % 16 != 0
    assert torch.equal(fused, ops.int8_linear(misaligned, w, scb, bias, 6.0))


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("rows", [4, 300])
def test_kernels_are_cuda_graph_capturable_and_compile_fullgraph(gpu_target, rows, rng):
    """rows = 300 takes the many-row routes: dequantize + cuBLAS, int8_quant + cuBLASLt + epilogue."""
    import kbitc.quant as kq
    from kbitc.runtime.reference import quant_state_args

    w = torch.randn(256, 512, generator=rng)
    packed, state = kq.quantize_4bit(w, "nf4", 64)
    qargs = [t.cuda() if isinstance(t, torch.Tensor) else t for t in quant_state_args(state)]
    packed = packed.cuda()
    wq, scb = [t.cuda() for t in kq.int8_vectorwise_quant(torch.randn(128, 512, generator=rng))]
    x = torch.randn(rows, 512, generator=rng).cuda().bfloat16()

    def step(inp):
        y = torch.ops.kbitc.linear_4bit(inp, packed, *qargs, None, "nf4", 64, 256)
        return y, torch.ops.kbitc.int8_linear(inp, wq, scb, None, 6.0)

    eager = step(x)
    static_x = x.clone()
    step(static_x)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static_x)
    x2 = torch.randn(rows, 512, generator=rng).cuda().bfloat16()
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(x2)
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(x)
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])

"""Every kbitc op schema in ONE place (torch.library), with fake kernels and device dispatch.

The default implementation is the pure-PyTorch reference (runtime/reference.py). On CPU and CUDA,
a call is routed to a generated kernel when a loaded library has one for its (dtype, quant type,
blocksize) (runtime/dispatch.py). Codebooks and scales are op inputs. Ops are opaque to
torch.compile / torch.export (no graph breaks) and launch without host synchronization.
The quantized linears have autograd (gradient w.r.t. x through the `*_grad_input` ops) and run in
the autocast dtype under torch.autocast (x and bias are cast; codebooks and scales are not).
"""

from __future__ import annotations

import functools
import weakref

from typing import Optional, Sequence

import torch

from kbitc.runtime import dispatch, reference
from kbitc.runtime.errors import UnsupportedInputError, expect

_DEVICES = ("cpu", "cuda")
# On CUDA, a 4-bit linear over at least this many rows of 16-bit activations dequantizes the weight
# with the dequantize_4bit kernel (~2 TB/s on an H100) into a transient buffer and runs cuBLAS: at
# M = 2048 that is ~0.85x of a bf16 linear, where the fused mma GEMM reaches 0.25x (bench/RESULTS.md).
# Fewer rows keep the fused kernels (GEMV / GEMM), which read the packed weight only.
CUDA_DEQUANT_GEMM_MIN_ROWS = 256
# On sm90 with K % 64 == 0 the fused kernel is the warpgroup (wgmma) GEMM, faster than dequantize +
# cuBLAS up to about this many rows (H100, bench/RESULTS.md "wgmma").
CUDA_DEQUANT_GEMM_MIN_ROWS_SM90 = 512
# LLM.int8() on CUDA with more rows than this: the int8 x int8 -> int32 product goes to cuBLASLt
# (torch._int_mm, which needs more than 16 rows), exact like the kernel's own int32 sums; the
# kernel adds scales, outlier columns and bias (int8_linear.cu.j2). On an H100 this is 2-5x faster
# than the kernel's wmma tiles, although torch picks an Ampere cuBLASLt kernel there (bench/RESULTS.md).
CUDA_INT_MM_MIN_ROWS = 17


_LIB = torch.library.Library("kbitc", "DEF")


def _op(fn):
    """Define kbitc::<fn name> with the schema of fn's type hints; fn is its CPU and CUDA kernel.

    A plain torch.library definition rather than torch.library.custom_op: a custom_op call spends
    ~10 µs more on the host, more than a decode-size GEMV spends on the GPU."""
    _LIB.define(fn.__name__ + torch.library.infer_schema(fn, mutates_args=()))
    for key in ("CPU", "CUDA"):
        _LIB.impl(fn.__name__, fn, key)
    return getattr(torch.ops.kbitc, fn.__name__).default


def _same_device(what: str, *tensors: Optional[torch.Tensor]) -> None:
    first = None
    for t in tensors:
        if t is None:
            continue
        if first is None:
            first = t.device
        elif t.device != first:
            devices = sorted({str(t.device) for t in tensors if t is not None})
            raise UnsupportedInputError(
                f"expected all tensors of {what} on one device, got {devices}; move them with .to()")


def _check_4bit(op: str, packed, code, absmax, absmax2, code2, n_elements: int, blocksize: int) -> None:
    _same_device(op, packed, code, absmax, absmax2, code2)
    expect(packed.dtype == torch.uint8 and packed.numel() == (n_elements + 1) // 2, UnsupportedInputError,
           lambda: f"{op}: expected {(n_elements + 1) // 2} packed uint8 bytes for {n_elements} weights, got "
           f"{packed.numel()} {packed.dtype}; the packed weight does not match its QuantState")
    blocks = -(-n_elements // blocksize)
    expect(absmax.numel() == blocks and absmax.dtype in (torch.float32, torch.uint8), UnsupportedInputError,
           lambda: f"{op}: expected {blocks} float32 (or double-quantized uint8) absmax values, got "
           f"{absmax.numel()} {absmax.dtype}")
    expect(absmax.dtype != torch.uint8 or (absmax2 is not None and code2 is not None), UnsupportedInputError,
           lambda: f"{op}: a double-quantized (uint8) absmax needs absmax2 and code2")
    expect(code.numel() == 16 and code.dtype == torch.float32, UnsupportedInputError,
           lambda: f"{op}: expected a float32 codebook of 16 entries, got {code.numel()} {code.dtype}")


def _scale_inputs(absmax, absmax2, code2):
    """Kernel slots (absmax f32 | NULL, absmax_q u8 | NULL, absmax2, code2)."""
    if absmax.dtype == torch.uint8:
        return [None, absmax, absmax2, code2]
    return [absmax, None, None, None]


_CODE_TABLES: dict[int, tuple] = {}


def _sorted_code(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(midpoints of the sorted code, the sort order as uint8, whether code is sorted already),
    cached per code tensor and version: every call reuses one table, and recomputing costs a sort
    (~25 µs of GPU time for 256 entries) and a host synchronization."""
    key = id(code)
    hit = _CODE_TABLES.get(key)
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    values, order = torch.sort(code, stable=True)
    tables = (((values[:-1] + values[1:]) / 2).contiguous(), order.to(torch.uint8),
              bool((code[1:] >= code[:-1]).all()))
    _CODE_TABLES[key] = (weakref.ref(code, lambda _, key=key: _CODE_TABLES.pop(key, None)), code._version, tables)
    return tables


# -- 4-bit ------------------------------------------------------------------------------------

@_op
def dequantize_4bit(packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                    absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                    quant_type: str, blocksize: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    _check_4bit("dequantize_4bit", packed, code, absmax, absmax2, code2, n, blocksize)
    found = dispatch.lookup("dequantize_4bit", packed.device, dtype, quant_type, blocksize)
    if found is None:
        return reference.dequantize_4bit(packed, code, absmax, absmax2, code2, offset, blocksize, shape, dtype)
    library, spec = found
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    library.call(spec, [packed, code] + _scale_inputs(absmax, absmax2, code2), [out], [n], [offset])
    return out


@torch.library.register_fake("kbitc::dequantize_4bit")
def _(packed, code, absmax, absmax2, code2, offset, quant_type, blocksize, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


@_op
def linear_4bit(x: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                bias: Optional[torch.Tensor], quant_type: str, blocksize: int, out_features: int) -> torch.Tensor:
    """x @ W^T + bias with W [out_features, in_features] stored as packed 4-bit codes."""
    k = x.shape[-1]
    _check_4bit("linear_4bit", packed, code, absmax, absmax2, code2, out_features * k, blocksize)
    _same_device("linear_4bit", x, packed, bias)
    expect(bias is None or (bias.numel() == out_features and bias.dtype == x.dtype), UnsupportedInputError,
           lambda: f"linear_4bit: expected a bias of {out_features} {x.dtype} values, got "
           f"{None if bias is None else (bias.numel(), bias.dtype)}")
    rows_count = x.numel() // k if k else 0
    if x.device.type == "cuda" and rows_count >= _dequant_gemm_min_rows(x.device, k) and x.dtype != torch.float32:
        deq = dispatch.lookup("dequantize_4bit", x.device, x.dtype, quant_type, blocksize)
        if deq is not None:  # many rows: dequantize once (a transient weight), then cuBLAS
            library, spec = deq
            w = torch.empty(out_features, k, dtype=x.dtype, device=x.device)
            library.call(spec, [packed, code] + _scale_inputs(absmax, absmax2, code2), [w], [out_features * k],
                         [offset])
            return torch.nn.functional.linear(x, w, bias)
    found = dispatch.lookup("linear_4bit", x.device, x.dtype, quant_type, blocksize)
    if found is None:
        return reference.linear_4bit(x, packed, code, absmax, absmax2, code2, offset, bias, blocksize, out_features)
    library, spec = found
    rows = x.reshape(-1, k).contiguous()
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    splits = _gemm_k_splits(rows, out_features)
    outputs = [out] if splits == 1 else [out, torch.empty(splits * out.numel(), dtype=torch.float32, device=x.device)]
    library.call(spec, [rows, packed, code] + _scale_inputs(absmax, absmax2, code2) + [bias], outputs,
                 [rows.shape[0], out_features, k, splits], [offset])
    return out.view(*x.shape[:-1], out_features)


# The CUDA tensor-core GEMM (M > 32) tiles the output 64 x 128; with few tiles (M = 33..255 on a
# 132-SM H100: 64 tiles for 4096 x 4096 at M = 128) most SMs idle, so K is split to give each SM
# about GEMM_BLOCKS_PER_SM blocks, at least GEMM_MIN_SPLIT_STEPS k steps of 128 each.
GEMM_BLOCKS_PER_SM = 3
# From this many rows the CUDA 4-bit linear may run the tiled GEMM (M <= 32: 8 / 16 / 32-row x tiles
# when the layer has >= 4096 outputs; linear_4bit.cu.j2's gmm and gmn), below it only the GEMVs, which
# take no workspace.
CUDA_GEMM_MIN_ROWS = 9
GEMM_MIN_SPLIT_STEPS = 4
GEMM_MAX_SPLITS = 8


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _dequant_gemm_min_rows(device: torch.device, k: int) -> int:
    """Rows from which a CUDA 4-bit linear dequantizes the weight and runs cuBLAS instead of fusing."""
    if k % 64 == 0 and _capability(device.index or 0) == (9, 0):
        return CUDA_DEQUANT_GEMM_MIN_ROWS_SM90
    return CUDA_DEQUANT_GEMM_MIN_ROWS


def _gemm_k_splits(rows: torch.Tensor, n: int) -> int:
    m, k = rows.shape
    if rows.device.type != "cuda" or rows.dtype == torch.float32 or m < CUDA_GEMM_MIN_ROWS:
        return 1
    tiles, sms = -(-n // 128) * -(-m // 64), _sm_count(rows.device.index or 0)
    if tiles >= sms:  # measured on the H100: splitting 172 or 224 tiles in two was slower
        return 1
    splits = round(GEMM_BLOCKS_PER_SM * sms / tiles)
    return max(1, min(splits, GEMM_MAX_SPLITS, -(-k // 128) // GEMM_MIN_SPLIT_STEPS))


@torch.library.register_fake("kbitc::linear_4bit")
def _(x, packed, code, absmax, absmax2, code2, offset, bias, quant_type, blocksize, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


@_op
def quantize_4bit(x: torch.Tensor, code: torch.Tensor, quant_type: str, blocksize: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [(n+1)//2], float32 absmax per block); double quant composes quantize_blockwise."""
    _same_device("quantize_4bit", x, code)
    found = dispatch.lookup("quantize_4bit", x.device, x.dtype, quant_type, blocksize)
    if found is None:
        return reference.quantize_4bit(x, code, blocksize)
    library, spec = found
    flat = x.reshape(-1).contiguous()
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    midpoints, order, _ = _sorted_code(code)
    library.call(spec, [flat, midpoints, order], [packed, absmax], [n])
    return packed, absmax


@torch.library.register_fake("kbitc::quantize_4bit")
def _(x, code, quant_type, blocksize):
    n = x.numel()
    return x.new_empty((n + 1) // 2, dtype=torch.uint8), x.new_empty(-(-n // blocksize), dtype=torch.float32)


# -- 8-bit block-wise -------------------------------------------------------------------------

@_op
def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _same_device("quantize_blockwise", x, code)
    found = dispatch.lookup("quantize_blockwise", x.device, x.dtype, "", blocksize)
    if found is None or not _sorted_code(code)[2]:
        return reference.quantize_blockwise(x, code, blocksize)
    library, spec = found
    flat = x.reshape(-1).contiguous()
    q = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-flat.numel() // blocksize), dtype=torch.float32, device=x.device)
    midpoints = _sorted_code(code)[0]
    library.call(spec, [flat, midpoints], [q, absmax], [flat.numel()])
    return q.view(x.shape), absmax


@torch.library.register_fake("kbitc::quantize_blockwise")
def _(x, code, blocksize):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(-(-x.numel() // blocksize), dtype=torch.float32)


@_op
def dequantize_blockwise(q: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    _same_device("dequantize_blockwise", q, code, absmax)
    found = dispatch.lookup("dequantize_blockwise", q.device, dtype, "", blocksize)
    if found is None:
        return reference.dequantize_blockwise(q, code, absmax, blocksize, dtype)
    library, spec = found
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    library.call(spec, [q.contiguous(), code, absmax], [out], [q.numel()])
    return out


@torch.library.register_fake("kbitc::dequantize_blockwise")
def _(q, code, absmax, blocksize, dtype):
    return q.new_empty(q.shape, dtype=dtype)


# -- LLM.int8() -------------------------------------------------------------------------------

@_op
def int8_quant(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise int8 of activations [rows, cols]: (codes, float32 rowmax, uint8 outlier-column mask)."""
    expect(x.dim() == 2, UnsupportedInputError, lambda: f"int8_quant: expected a 2-D tensor, got shape {list(x.shape)}")
    found = dispatch.lookup("int8_quant", x.device, x.dtype)
    if found is None:
        return reference.int8_quant(x, threshold)
    library, spec = found
    rows, cols = x.shape
    codes = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
    rowmax = torch.empty(rows, dtype=torch.float32, device=x.device)
    mask = torch.empty(cols, dtype=torch.uint8, device=x.device)
    library.call(spec, [x.contiguous()], [codes, rowmax, mask], [rows, cols], [threshold])
    return codes, rowmax, mask


@torch.library.register_fake("kbitc::int8_quant")
def _(x, threshold):
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[0], dtype=torch.float32),
            x.new_empty(x.shape[1], dtype=torch.uint8))


@_op
def int8_linear(x: torch.Tensor, w: torch.Tensor, scb: torch.Tensor, bias: Optional[torch.Tensor],
                threshold: float) -> torch.Tensor:
    """LLM.int8() linear: int8 x int8 -> int32 for inlier features, 16/32-bit for outlier columns."""
    k = x.shape[-1]
    _same_device("int8_linear", x, w, scb, bias)
    expect(w.dtype == torch.int8 and w.dim() == 2 and w.shape[1] == k and scb.numel() == w.shape[0],
           UnsupportedInputError,
           lambda: f"int8_linear: expected int8 weight [out, {k}] and one scale per row, got {w.dtype} "
           f"{list(w.shape)} and {scb.numel()} scales")
    found = dispatch.lookup("int8_linear", x.device, x.dtype)
    if found is None:
        return reference.int8_linear(x, w, scb, bias, threshold)
    library, spec = found
    rows = x.reshape(-1, k).contiguous()
    m, n = rows.shape[0], w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    workspace = [torch.empty(m, k, dtype=torch.int8, device=x.device),
                 torch.empty(m, dtype=torch.float32, device=x.device),
                 torch.empty(k, dtype=torch.uint8, device=x.device)]
    acc = _int8_product_by_cublas(rows, w, workspace, threshold)
    library.call(spec, [rows, w, scb, bias, acc], [out] + workspace, [m, n, k], [threshold])
    return out.view(*x.shape[:-1], n)


def _int8_product_by_cublas(rows: torch.Tensor, w: torch.Tensor, workspace: list[torch.Tensor],
                            threshold: float) -> Optional[torch.Tensor]:
    """For many rows on CUDA: quantize into the workspaces and return the int32 product codes @ w^T
    from cuBLASLt (torch._int_mm), for the int8_linear kernel to finish (scales, outliers, bias).
    None where the kernel does it all: few rows (its GEMV), shapes cuBLASLt refuses (sizes not
    multiples of 8), or an artifact built without the int8_quant kernel."""
    m, k = rows.shape
    if (rows.device.type != "cuda" or m < CUDA_INT_MM_MIN_ROWS or k % 8 or w.shape[0] % 8
            or not w.is_contiguous() or _capability(rows.device.index or 0) < (8, 0)):
        return None  # (sm75: cuBLASLt's int8 GEMM wants other layouts; the kernel does it)
    found = dispatch.lookup("int8_quant", rows.device, rows.dtype)
    if found is None:
        return None
    library, spec = found
    library.call(spec, [rows], workspace, [m, k], [threshold])
    return torch._int_mm(workspace[0], w.t())


@torch.library.register_fake("kbitc::int8_linear")
def _(x, w, scb, bias, threshold):
    return x.new_empty(*x.shape[:-1], w.shape[0])


# -- backward: gradients w.r.t. the input of the quantized linears ---------------------------------
# The quantized weights are frozen: only x (and a bias that requires grad) get gradients. The
# generated kernels decode W on the fly; the dequantized weight is never written to memory.

@_op
def linear_4bit_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor,
                           absmax2: Optional[torch.Tensor], code2: Optional[torch.Tensor], offset: float,
                           quant_type: str, blocksize: int, in_features: int) -> torch.Tensor:
    """grad_x [..., in_features] = grad_out [..., out_features] @ W_hat (float32 accumulation)."""
    n = grad_out.shape[-1]
    _check_4bit("linear_4bit_grad_input", packed, code, absmax, absmax2, code2, n * in_features, blocksize)
    _same_device("linear_4bit_grad_input", grad_out, packed)
    found = dispatch.lookup("linear_4bit_grad_input", grad_out.device, grad_out.dtype, quant_type, blocksize)
    rows = grad_out.reshape(-1, n)
    if found is None or rows.shape[0] == 0:
        return reference.linear_4bit_grad_input(grad_out, packed, code, absmax, absmax2, code2, offset, blocksize,
                                                in_features)
    library, spec = found
    rows = rows.contiguous()
    out = torch.empty(rows.shape[0], in_features, dtype=grad_out.dtype, device=grad_out.device)
    library.call(spec, [rows, packed, code] + _scale_inputs(absmax, absmax2, code2), [out],
                 [rows.shape[0], n, in_features], [offset])
    return out.view(*grad_out.shape[:-1], in_features)


@torch.library.register_fake("kbitc::linear_4bit_grad_input")
def _(grad_out, packed, code, absmax, absmax2, code2, offset, quant_type, blocksize, in_features):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


@_op
def int8_linear_grad_input(grad_out: torch.Tensor, w: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_out @ (w * scb[:, None] / 127): the whole dequantized weight (docs/kernel_abi.md)."""
    _same_device("int8_linear_grad_input", grad_out, w, scb)
    expect(w.dtype == torch.int8 and w.dim() == 2 and w.shape[0] == grad_out.shape[-1] and scb.numel() == w.shape[0],
           UnsupportedInputError,
           lambda: f"int8_linear_grad_input: expected int8 weight [{grad_out.shape[-1]}, in] and one scale per row, got "
           f"{w.dtype} {list(w.shape)} and {scb.numel()} scales")
    n, k = w.shape
    found = dispatch.lookup("int8_linear_grad_input", grad_out.device, grad_out.dtype)
    rows = grad_out.reshape(-1, n)
    if found is None or rows.shape[0] == 0:
        return reference.int8_linear_grad_input(grad_out, w, scb)
    library, spec = found
    rows = rows.contiguous()
    out = torch.empty(rows.shape[0], k, dtype=grad_out.dtype, device=grad_out.device)
    library.call(spec, [rows, w, scb], [out], [rows.shape[0], n, k])
    return out.view(*grad_out.shape[:-1], k)


@torch.library.register_fake("kbitc::int8_linear_grad_input")
def _(grad_out, w, scb):
    return grad_out.new_empty(*grad_out.shape[:-1], w.shape[1])


def _bias_grad(ctx, grad: torch.Tensor, index: int):
    if not ctx.needs_input_grad[index]:
        return None
    return grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)


def _setup_linear_4bit(ctx, inputs, output):
    x, packed, code, absmax, absmax2, code2, offset, bias, quant_type, blocksize, _ = inputs
    ctx.save_for_backward(packed, code, absmax, absmax2, code2)
    ctx.offset, ctx.quant_type, ctx.blocksize, ctx.in_features = offset, quant_type, blocksize, x.shape[-1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_linear_4bit(ctx, grad):
    packed, code, absmax, absmax2, code2 = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = linear_4bit_grad_input(grad, packed, code, absmax, absmax2, code2, ctx.offset, ctx.quant_type,
                                        ctx.blocksize, ctx.in_features)
    return grad_x, None, None, None, None, None, None, _bias_grad(ctx, grad, 7), None, None, None


def _setup_int8_linear(ctx, inputs, output):
    x, w, scb, bias, _ = inputs
    ctx.save_for_backward(w, scb)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_int8_linear(ctx, grad):
    w, scb = ctx.saved_tensors
    grad_x = int8_linear_grad_input(grad, w, scb) if ctx.needs_input_grad[0] else None
    return grad_x, None, None, _bias_grad(ctx, grad, 3), None


def _setup_4bit_grad_input(ctx, inputs, output):
    grad_out, packed, code, absmax, absmax2, code2, offset, quant_type, blocksize, _ = inputs
    ctx.save_for_backward(packed, code, absmax, absmax2, code2)
    ctx.offset, ctx.quant_type, ctx.blocksize, ctx.out_features = offset, quant_type, blocksize, grad_out.shape[-1]


def _double_backward_4bit(ctx, gg):
    """grad_x is linear in grad_out: its backward is the forward linear (double backward)."""
    packed, code, absmax, absmax2, code2 = ctx.saved_tensors
    grad = linear_4bit(gg, packed, code, absmax, absmax2, code2, ctx.offset, None, ctx.quant_type, ctx.blocksize,
                       ctx.out_features)
    return (grad,) + (None,) * 9


def _setup_int8_grad_input(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _double_backward_int8(ctx, gg):
    """gg @ W_hat^T in float (int8_linear would quantize gg: not the exact derivative)."""
    w, scb = ctx.saved_tensors
    return torch.nn.functional.linear(gg.float(), reference.int8_weight_dequant(w, scb)).to(gg.dtype), None, None


def _register_autograd(op_name: str, backward, setup_context) -> None:
    """The op's Autograd kernel: a torch.autograd.Function that runs the op below autograd, then
    setup_context; backward as torch.library.register_autograd takes it. Lighter on the host than
    register_autograd (no pytree walks over the arguments): on a QLoRA step every projection's
    forward and backward pass through here (bench/RESULTS.md, "host time")."""
    op = getattr(torch.ops.kbitc, op_name).default

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    def kernel(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():  # nothing to record (inference, frozen inputs)
            return op(*args)

    Function.__name__ = Function.__qualname__ = f"{op_name}_autograd"
    _LIB.impl(op_name, kernel, "Autograd")


_register_autograd("linear_4bit", _backward_linear_4bit, _setup_linear_4bit)
_register_autograd("linear_4bit_grad_input", _double_backward_4bit, _setup_4bit_grad_input)
_register_autograd("int8_linear_grad_input", _double_backward_int8, _setup_int8_grad_input)
_register_autograd("int8_linear", _backward_int8_linear, _setup_int8_linear)


# -- autocast: the quantized linears run in the autocast dtype, as F.linear does -----------------
# torch.library.register_autocast would cast every floating input, codebooks and float32 scales
# included; only the activation and the bias (arguments `cast`) follow the autocast dtype.
_AUTOCAST_LIB = torch.library.Library("kbitc", "IMPL")


def _register_autocast(op_name: str, cast: tuple[int, ...]) -> None:
    overload = getattr(torch.ops.kbitc, op_name).default
    for device_type in _DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        exclude = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _exclude=exclude):
            dtype = torch.get_autocast_dtype(_device_type)
            args = list(args)
            for i in cast:
                t = args[i]
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == _device_type:
                    args[i] = t.to(dtype)
            with torch._C._ExcludeDispatchKeyGuard(_exclude):
                return overload(*args)

        _AUTOCAST_LIB.impl(op_name, kernel, key, with_keyset=True)


_register_autocast("linear_4bit", cast=(0, 7))
_register_autocast("int8_linear", cast=(0, 3))


ALL_OPS = (dequantize_4bit, linear_4bit, quantize_4bit, quantize_blockwise, dequantize_blockwise,
           int8_quant, int8_linear, linear_4bit_grad_input, int8_linear_grad_input)

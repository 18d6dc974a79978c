"""kbitc.optim on CUDA: the fused step kernel compiles for sm75/sm80/sm90 everywhere (CI has nvcc, no
GPU), and on a GPU equals the pure-PyTorch reference step bit for bit (skipped without one)."""


import pytest
import torch

import kbitc.optim as ko
from kbitc.compiler.kernels import build_kernels
from kbitc.runtime.optim import kernels, paged, reference
from kbitc.runtime.quant.blockwise import quantize_blockwise
from kbitc.runtime.quant.codebooks import encoder_dynamic
from tests.runtime import kernel_checks as checks

needs_nvcc, needs_gpu = checks.needs_nvcc, checks.needs_gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = (1, 255, 256, 4095, 4097, 70000, 1 << 20)


@needs_nvcc
@pytest.mark.parametrize("target", ["sm75", "sm80", "sm90"])
def test_optimizer_kernels_compile(target):
    specs = kernels.specs_for(target)
    library = build_kernels(specs, register=False)
    assert set(library.specs) == {s.name for s in specs}


@needs_nvcc
def test_paged_memory_library_compiles_and_exports_the_allocator():
    path = paged.build("90")
    symbols = open(path, "rb").read()
    for name in (b"kbitc_managed_malloc", b"kbitc_managed_free", b"kbitc_prefetch", b"kbitc_is_managed"):
        assert name in symbols


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("kind", reference.KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_cuda_step_matches_reference(kind, dtype, rng):
    for n in SIZES:
        for step, wd in ((1, 0.0), (9, 0.05)):
            p = torch.randn(n, generator=rng).to(dtype)
            grad = (torch.randn(n, generator=rng) * 0.1).to(dtype)
            s1, a1 = quantize_blockwise(torch.randn(n, generator=rng) * 0.01, 256, signed=True)
            s2, a2 = quantize_blockwise(torch.rand(n, generator=rng) * 1e-4, 256, signed=False)
            h = reference.hyperparams(kind, 1e-3, 0.9, 0.999, 1e-8, wd, step)
            two = reference.TWO_STATE[kind]
            pk, gk, s1k, s2k = p.cuda(), grad.cuda(), s1.cuda(), s2.cuda()
            absmax = (torch.stack([a1, a2]) if two else a1.clone()).cuda()
            assert kernels.fused_step(kind, pk, gk, s1k, s2k, absmax, h)
            torch.cuda.synchronize()
            pr, s1r, a1r, s2r, a2r = p.clone(), s1.clone(), a1.clone(), s2.clone(), a2.clone()
            reference.step_8bit(kind, pr, grad, s1r, a1r, s2r, a2r, h)  # on CPU: the oracle
            assert torch.equal(pk.cpu(), pr), (kind, dtype, n, step)
            codes = [(s1k.cpu(), s1r, a1r, True)] + ([(s2k.cpu(), s2r, a2r, False)] if two else [])
            for got, want, amax, signed in codes:
                differ = got != want
                if differ.any():  # allowed only at exact ties (value on the midpoint, within 1 ulp)
                    value = reference.dequantize_state(want, amax, signed)[differ.view(-1)]
                    mid = encoder_dynamic(signed).midpoints[torch.minimum(got, want)[differ].long().clamp(max=254)]
                    scaled = value / amax.repeat_interleave(256)[:n][differ.view(-1)]
                    assert ((scaled - mid).abs() <= 1.2e-7 * mid.abs()).all()
                assert differ.sum().item() == 0, f"{differ.sum().item()} codes differ ({kind}, {dtype}, n={n})"
            got_absmax = absmax.cpu()
            assert torch.equal(got_absmax[0] if two else got_absmax, a1r)
            if two:
                assert torch.equal(got_absmax[1], a2r)


def _train_on(device, cls, steps=5, **kwargs):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).to(device)) for n in (70000, 4097, 100)]
    opt = cls(params, **kwargs)
    for step in range(steps):
        gg = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg).to(device)
        opt.step()
    return params, opt


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("cls", [ko.AdamW8bit, ko.Lion8bit, ko.SGD8bit])
def test_optimizer_on_cuda_equals_cpu(cls):
    kwargs = dict(lr=1e-2) if cls is ko.SGD8bit else {}
    gpu, _ = _train_on("cuda", cls, **kwargs)
    cpu, _ = _train_on("cpu", cls, **kwargs)
    for a, b in zip(gpu, cpu):
        assert torch.equal(a.detach().cpu(), b.detach())


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("cls", [ko.PagedAdamW8bit, ko.PagedLion8bit])
def test_paged_state_is_managed_memory_and_matches_plain(cls):
    params, opt = _train_on("cuda", cls)
    plain, _ = _train_on("cuda", cls.__mro__[1])
    big = opt.state[params[0]]
    assert big["state1"].dtype == torch.uint8 and paged.is_managed(big["state1"])
    for a, b in zip(params, plain):
        assert torch.equal(a, b)

"""Access to bitsandbytes' reference kernels for the bit-exactness tests.

On CPU, bitsandbytes routes 8-bit block-wise quantization to its C library, whose binary-search
lookup misplaces values lying within ~2e-5 of a midpoint between two codes (it picks the farther
code). Its reference (default) kernel and its CUDA kernel pick the nearest code, as kbitc does; the
reference kernel is reached by redispatching past the CPU registration.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test dependency")
import bitsandbytes.functional as F  # noqa: E402

_DEFAULT_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def bnb_reference_quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """bitsandbytes' reference (nearest-code) 8-bit block-wise quantizer."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    return op.redispatch(_DEFAULT_KEYS, x, code, blocksize)


def assert_only_near_midpoint_differences(ours, theirs, values, code, max_fraction):
    """Where codes differ, ours is the nearer code and theirs is farther by at most 6e-5 (normalized)."""
    differ = ours != theirs
    if not differ.any():
        return
    assert differ.float().mean() <= max_fraction, f"{int(differ.sum())} of {differ.numel()} codes differ"
    v = values[differ].double()
    c = code.double()
    ours_d = (v - c[ours[differ].long()]).abs()
    theirs_d = (v - c[theirs[differ].long()]).abs()
    # (+1e-7: a value on a float32 midpoint is a tie that float64 may break either way)
    assert bool((ours_d <= theirs_d + 1e-7).all()), "kbitc's code is not the nearer one where they differ"
    assert float((theirs_d - ours_d).max()) <= 6e-5

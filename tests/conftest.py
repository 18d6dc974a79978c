"""Shared test setup.

bitsandbytes wraps some reference kernels in torch.compile; compiling them for every odd shape makes
the suite slow without changing their numerics, so dynamo is disabled for the test process.
"""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: reproducible, independent draws."""
    return torch.Generator().manual_seed(1234)

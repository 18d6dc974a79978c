"""kbitc: an ahead-of-time k-bit quantization compiler for PyTorch."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("kbitc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from kbitc import quant  # noqa: E402,F401
from kbitc.runtime.errors import KbitcError  # noqa: E402,F401

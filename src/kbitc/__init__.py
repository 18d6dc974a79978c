"""kbitc: an ahead-of-time k-bit quantization compiler for PyTorch."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("kbitc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from kbitc import lora, optim, quant  # noqa: E402,F401
from kbitc.runtime.errors import KbitcError  # noqa: E402,F401


def compile(model, *args, **kwargs):
    """Compile MODEL into a .kbit artifact (see kbitc.compiler.pipeline.compile)."""
    from kbitc.compiler.pipeline import compile as _compile

    return _compile(model, *args, **kwargs)


def load(path, device="cpu", verify=True):
    """Load a .kbit artifact as an nn.Module running kbitc kernels (kbitc.runtime.loader.load)."""
    from kbitc.runtime.loader import load as _load

    return _load(path, device=device, verify=verify)

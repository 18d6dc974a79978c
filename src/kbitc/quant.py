"""Public facade: `kbitc.quant` is `kbitc.runtime.quant`."""

from kbitc.runtime.quant import *  # noqa: F401,F403
from kbitc.runtime.quant import __all__  # noqa: F401

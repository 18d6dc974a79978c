"""Public facade: `kbitc.optim` is `kbitc.runtime.optim` (8-bit optimizers)."""

from kbitc.runtime.optim import *  # noqa: F401,F403
from kbitc.runtime.optim import __all__  # noqa: F401

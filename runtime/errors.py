"""Error types. Every user-facing failure is a KbitcError subclass whose message says what was
expected, what arrived and how to fix it (DESIGN.md section 8)."""


class KbitcError(Exception):
    """Base class of every error kbitc raises on purpose."""


class UnsupportedInputError(KbitcError, ValueError):
    """An argument kbitc cannot handle: wrong dtype, blocksize, quant type, shape."""


class NonFiniteWeightError(KbitcError, ValueError):
    """A tensor to quantize holds NaN or Inf: quantizing it would silently produce garbage."""


class QuantStateError(KbitcError, ValueError):
    """A QuantState does not match the data it describes, or its serialized form is invalid."""


class BnbFormatError(KbitcError, ValueError):
    """A bitsandbytes state dict is missing keys or holds inconsistent tensors."""


def expect(condition: bool, error_type: type, message) -> None:
    """Raise `error_type(message)` unless `condition` holds (never an assert: user input).
    `message` may be a zero-argument callable: hot paths (every op call) then build it only on failure."""
    if not condition:
        raise error_type(message() if callable(message) else message)


class OptimizerConfigError(KbitcError, ValueError):
    """An optimizer hyperparameter, parameter or gradient kbitc.optim cannot use (lr < 0, sparse grads...)."""

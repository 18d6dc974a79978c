"""kbitc.runtime: what a deployed artifact needs (formats, ops, loader). Never imports the compiler."""

from kbitc.runtime.errors import (  # noqa: F401
    BnbFormatError,
    KbitcError,
    NonFiniteWeightError,
    QuantStateError,
    UnsupportedInputError,
)

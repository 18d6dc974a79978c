"""kbitc.quant: pure-PyTorch k-bit formats, the numeric oracle, bit-compatible with bitsandbytes.

Vectorized and device-agnostic: CPU and CUDA tensors alike.
"""

from kbitc.runtime.quant.blockwise import (
    absmax_of,
    dequantize_4bit,
    dequantize_blockwise,
    quantize_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from kbitc.runtime.quant.bnb_format import ImportedLinear, from_bnb_state_dict, to_bnb_state_dict
from kbitc.runtime.quant.codebooks import code_4bit, dynamic_map
from kbitc.runtime.quant.int8 import (
    int8_linear,
    int8_quantize_activations,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    outlier_columns,
)
from kbitc.runtime.quant.state import NestedAbsmax, QuantState, QUANT_STATE_VERSION

__all__ = [
    "ImportedLinear", "NestedAbsmax", "QuantState", "QUANT_STATE_VERSION",
    "absmax_of", "code_4bit", "dequantize_4bit", "dequantize_blockwise", "dynamic_map",
    "from_bnb_state_dict", "int8_linear", "int8_quantize_activations", "int8_vectorwise_dequant",
    "int8_vectorwise_quant", "outlier_columns", "quantize_4bit", "quantize_blockwise",
    "to_bnb_state_dict", "unpack_4bit",
]

"""LLM.int8(): vector-wise int8 quantization with outlier-column decomposition (reference math).

Weights are quantized per output row (int8 CB + float32 SCB), activations per row; input features
where any |x| >= threshold are outlier columns, zeroed in the int8 path and computed in 16-bit
against the dequantized weight columns. Matches bitsandbytes' Linear8bitLt numerics.
"""

from __future__ import annotations

import torch

from kbitc.runtime.errors import UnsupportedInputError, expect
from kbitc.runtime.quant.blockwise import check_float_input
from kbitc.runtime.quant.state import dtype_name

INT8_SCALE = 127.0


def _rows(x: torch.Tensor, what: str) -> torch.Tensor:
    check_float_input(x, what)
    expect(x.dim() >= 1, UnsupportedInputError, f"expected {what} with at least 1 dimension")
    return x.reshape(-1, x.shape[-1])


def int8_vectorwise_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8: (int8 codes shaped like w, float32 absmax per row).

    code = round(w * 127 / rowmax) (round half to even); an all-zero row gets codes 0 and scale 0.
    """
    rows = _rows(w, "the tensor to quantize")
    scale = rows.abs().amax(dim=1).float()
    expect(bool(torch.isfinite(scale).all()), UnsupportedInputError,
           "expected finite values in the tensor to quantize, found NaN or Inf")
    factor = torch.where(scale > 0, INT8_SCALE / scale, torch.zeros_like(scale))
    codes = torch.round(rows * factor.unsqueeze(1)).to(torch.int8)
    return codes.view(w.shape), scale.view(w.shape[:-1])


def int8_vectorwise_dequant(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 codes * scale / 127 per row."""
    expect(codes.dtype == torch.int8, UnsupportedInputError,
           f"expected int8 codes, got {dtype_name(codes.dtype)}")
    return codes.float() * (scale.float().unsqueeze(-1) / INT8_SCALE)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask over input features: True where any row has |x| >= threshold (no host sync)."""
    rows = _rows(x, "the activations")
    if threshold <= 0:
        return torch.zeros(rows.shape[1], dtype=torch.bool, device=x.device)
    return (rows.abs() >= threshold).any(dim=0)


def int8_quantize_activations(x: torch.Tensor, threshold: float = 0.0
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations for the int8 path: (int8 codes [rows, in], float32 row absmax, outlier mask [in]).

    The outlier values themselves are excluded from the row absmax, and whole outlier columns are
    zeroed in the codes, exactly as bitsandbytes does.
    """
    rows = _rows(x, "the activations")
    mask = outlier_columns(rows, threshold)
    if threshold > 0:
        rows = rows.masked_fill(rows.abs() >= threshold, 0)
    codes, scale = int8_vectorwise_quant(rows)
    codes = codes.masked_fill(mask.unsqueeze(0), 0)
    return codes, scale, mask


def int8_linear(x: torch.Tensor, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, threshold: float = 6.0) -> torch.Tensor:
    """Reference mixed-precision int8 linear: x @ W^T (+ bias) with outlier decomposition.

    out = (int32 sum of int8 products) * rowmax(x) * SCB / 127^2 + x[:, outliers] @ W_hat[:, outliers]^T
    where W_hat = CB * SCB / 127. The result has x's dtype.
    """
    expect(x.shape[-1] == weight_codes.shape[-1], UnsupportedInputError,
           f"expected activations with {weight_codes.shape[-1]} input features, got shape {list(x.shape)}")
    expect(weight_codes.dtype == torch.int8 and weight_scale.numel() == weight_codes.shape[0],
           UnsupportedInputError,
           f"expected int8 weight codes [out, in] and one scale per output row, got "
           f"{dtype_name(weight_codes.dtype)} {list(weight_codes.shape)} and {weight_scale.numel()} scales")
    rows = x.reshape(-1, x.shape[-1])
    codes, scale, mask = int8_quantize_activations(rows, threshold)
    # int8 x int8 products summed in int32: exact in float64 for any realistic in_features (< 2^37).
    acc = codes.double() @ weight_codes.double().t()
    out = acc * (scale.double().unsqueeze(1) * weight_scale.double().unsqueeze(0)) / INT8_SCALE**2
    weight_hat = int8_vectorwise_dequant(weight_codes, weight_scale).double()
    outlier_x = rows.double() * mask.to(rows.dtype).unsqueeze(0)
    out = out + outlier_x @ weight_hat.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype).view(*x.shape[:-1], weight_codes.shape[0])

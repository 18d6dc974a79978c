"""8-bit optimizers: Adam8bit, AdamW8bit, Lion8bit, SGD8bit and the paged variants.

State (bitsandbytes' layout and rules): for a parameter with at least `min_8bit_size` (4096)
elements, uint8 codes shaped like the parameter plus float32 absmax per 256-element block --
`state1`/`absmax1` (signed dynamic map: Adam's m, Lion's and SGD's momentum) and, for Adam,
`state2`/`absmax2` (unsigned map: v). Smaller tensors, and parameters set to 32 bits, keep float32
`state1`/`state2`. Update rules follow bitsandbytes' 8-bit block-wise optimizers: Adam's weight
decay is decoupled (AdamW8bit is Adam8bit with weight_decay 1e-2), Lion's too, SGD's is L2 added to
the gradient; SGD's first step sets momentum = gradient. Not implemented (bitsandbytes options):
percentile_clipping, max_unorm, gnorm_scale, Nesterov / dampening, skip_zeros.

Keeping 32-bit state for one parameter: `opt.override(param, optim_bits=32)` before its first step,
or a param group with `"optim_bits": 32` (also `"min_8bit_size"` per group).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from kbitc.runtime.errors import OptimizerConfigError, UnsupportedInputError, expect
from kbitc.runtime.optim import kernels, paged, reference
from kbitc.runtime.optim.reference import BLOCKSIZE, TWO_STATE

MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep float32 state
OVERRIDE_KEYS = ("optim_bits", "min_8bit_size", "lr", "betas", "eps", "weight_decay")


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float, optim_bits: int,
                 min_8bit_size: int) -> None:
    expect(isinstance(lr, (int, float)) and lr >= 0.0, OptimizerConfigError, f"expected lr >= 0, got {lr!r}")
    expect(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), OptimizerConfigError,
           f"expected two betas in [0, 1), got {betas!r}")
    expect(eps >= 0.0, OptimizerConfigError, f"expected eps >= 0, got {eps!r}")
    expect(weight_decay >= 0.0, OptimizerConfigError, f"expected weight_decay >= 0, got {weight_decay!r}")
    expect(optim_bits in (8, 32), OptimizerConfigError, f"expected optim_bits 8 or 32, got {optim_bits!r}")
    expect(isinstance(min_8bit_size, int) and min_8bit_size >= 1, OptimizerConfigError,
           f"expected min_8bit_size >= 1, got {min_8bit_size!r}")


class Optimizer8bit(torch.optim.Optimizer):
    """Shared machinery: state layout, per-parameter overrides, fused kernel or reference step."""

    kind = ""  # "adam" | "lion" | "momentum" (reference.KINDS)
    paged = False

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 optim_bits: int = 8, min_8bit_size: int = MIN_8BIT_SIZE, use_kernels: bool = True):
        betas = tuple(betas)
        _check_hyper(lr, betas, eps, weight_decay, optim_bits, min_8bit_size)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, optim_bits=optim_bits,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hyper(group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"],
                         group["optim_bits"], group["min_8bit_size"])
            for p in group["params"]:
                expect(p.is_floating_point() and p.dtype in kernels.DTYPE_SHORT, UnsupportedInputError,
                       f"expected float32, float16 or bfloat16 parameters, got {p.dtype} of shape {list(p.shape)}")
        self.use_kernels = use_kernels
        self._overrides: dict[int, dict] = {}  # id(param) -> settings replacing its group's
        self._paged_warned = False

    # -- configuration ------------------------------------------------------------------------
    def override(self, param: torch.Tensor, **settings) -> None:
        """Per-parameter settings (e.g. optim_bits=32 to keep float32 state), before its first step."""
        unknown = sorted(set(settings) - set(OVERRIDE_KEYS))
        expect(not unknown, OptimizerConfigError, f"expected override keys among {OVERRIDE_KEYS}, got {unknown}")
        expect(any(param is p for g in self.param_groups for p in g["params"]), OptimizerConfigError,
               "expected a parameter of this optimizer")
        expect(len(self.state.get(param, {})) == 0 or "optim_bits" not in settings, OptimizerConfigError,
               "optim_bits must be overridden before the parameter's first step (its state exists already)")
        self._overrides.setdefault(id(param), {}).update(settings)
        cfg = self._config(param, next(g for g in self.param_groups if any(param is p for p in g["params"])))
        _check_hyper(cfg["lr"], tuple(cfg["betas"]), cfg["eps"], cfg["weight_decay"], cfg["optim_bits"],
                     cfg["min_8bit_size"])

    def _config(self, p: torch.Tensor, group: dict) -> dict:
        return {**group, **self._overrides.get(id(p), {})}

    # -- state ----------------------------------------------------------------------------------
    def _zeros(self, shape, dtype, device) -> torch.Tensor:
        if self.paged and device.type == "cuda":
            return paged.zeros(shape, dtype, device)
        return torch.zeros(shape, dtype=dtype, device=device)

    def _init_state(self, p: torch.Tensor, state: dict, cfg: dict) -> None:
        if self.paged and p.device.type != "cuda" and not self._paged_warned:
            self._paged_warned = True
            warnings.warn(f"{type(self).__name__}: paged (CUDA managed) state needs CUDA parameters; parameters "
                          f"on {p.device.type} keep ordinary memory and behave as the non-paged optimizer",
                          paged.PagedMemoryWarning, stacklevel=3)
        two = TWO_STATE[self.kind]
        state["step"] = 0
        if cfg["optim_bits"] == 32 or p.numel() < cfg["min_8bit_size"]:
            state["state1"] = self._zeros(p.shape, torch.float32, p.device)
            if two:
                state["state2"] = self._zeros(p.shape, torch.float32, p.device)
            return
        blocks = -(-p.numel() // BLOCKSIZE)
        state["state1"] = self._zeros(p.shape, torch.uint8, p.device)
        absmax = torch.zeros((2 if two else 1, blocks), dtype=torch.float32, device=p.device)
        state["absmax1"] = absmax[0]
        if two:
            state["state2"] = self._zeros(p.shape, torch.uint8, p.device)
            state["absmax2"] = absmax[1]

    @staticmethod
    def _absmax_buffer(state: dict, two: bool) -> torch.Tensor:
        """absmax1 as the start of one [states, blocks] buffer (the kernel's layout), re-packed if a
        load made absmax1 and absmax2 separate tensors."""
        a1 = state["absmax1"]
        if not two:
            if not a1.is_contiguous():
                state["absmax1"] = a1 = a1.contiguous()
            return a1
        a2 = state["absmax2"]
        adjacent = (a1.is_contiguous() and a2.is_contiguous() and a1.dtype == a2.dtype == torch.float32
                    and a2.data_ptr() == a1.data_ptr() + 4 * a1.numel()
                    and a1.untyped_storage().data_ptr() == a2.untyped_storage().data_ptr())
        if not adjacent:
            packed = torch.stack([a1.float(), a2.float()])
            state["absmax1"], state["absmax2"] = packed[0], packed[1]
        return state["absmax1"]

    # -- the step -------------------------------------------------------------------------------
    def _hyper(self, cfg: dict, step: int) -> reference.Hyper:
        beta1, beta2 = cfg["betas"]
        return reference.hyperparams(self.kind, cfg["lr"], beta1, beta2, cfg["eps"], cfg["weight_decay"], step)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                expect(not p.grad.is_sparse, OptimizerConfigError,
                       f"{type(self).__name__} does not support sparse gradients (parameter of shape {list(p.shape)})")
                self._step_param(p, self._config(p, group))
        return loss

    def _step_param(self, p: torch.Tensor, cfg: dict) -> None:
        state = self.state[p]
        if len(state) == 0:
            self._init_state(p, state, cfg)
        state["step"] += 1
        h = self._hyper(cfg, state["step"])
        two = TWO_STATE[self.kind]
        grad = p.grad.contiguous()
        target = p.data if p.data.is_contiguous() else p.data.contiguous()
        s1, s2 = state["state1"], state.get("state2")
        if s1.dtype == torch.uint8:
            if self.paged:
                paged.prefetch(s1)
                if s2 is not None:
                    paged.prefetch(s2)
            absmax = self._absmax_buffer(state, two)
            done = self.use_kernels and kernels.fused_step(self.kind, target, grad, s1, s2, absmax, h)
            if not done:
                reference.step_8bit(self.kind, target, grad, s1, state["absmax1"], s2, state.get("absmax2"), h)
        else:
            reference.step_32bit(self.kind, target, grad, s1, s2, h)
        if target is not p.data:
            p.data.copy_(target)

    # -- serialization ----------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state tensors keep their dtype (torch would cast float32 absmax / state to a
        bf16 param's dtype), and are copied, so the caller's dict is never mutated by later steps."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            fixed = {}
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    value = self._zeros(value.shape, value.dtype, p.device).copy_(value) \
                        if key in ("state1", "state2") else value.to(device=p.device, copy=True)
                fixed[key] = value
            self.state[p] = fixed


class Adam8bit(Optimizer8bit):
    """Adam with 8-bit block-wise state (weight decay decoupled, as bitsandbytes' Adam8bit)."""

    kind = "adam"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class AdamW8bit(Adam8bit):
    """AdamW with 8-bit block-wise state (bitsandbytes' defaults: weight_decay 1e-2)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


class Lion8bit(Optimizer8bit):
    """Lion (sign of an interpolated momentum) with 8-bit block-wise momentum."""

    kind = "lion"

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr, betas, 0.0, weight_decay, **kwargs)


class SGD8bit(Optimizer8bit):
    """SGD with momentum (8-bit block-wise momentum buffer); momentum must be > 0, as in bitsandbytes."""

    kind = "momentum"

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, **kwargs):
        expect(momentum > 0.0, OptimizerConfigError,
               f"expected momentum > 0 (SGD8bit keeps a momentum buffer; use torch.optim.SGD without it), got {momentum!r}")
        super().__init__(params, lr, (momentum, 0.0), 0.0, weight_decay, **kwargs)


class PagedAdam8bit(Adam8bit):
    """Adam8bit with state in CUDA managed memory, prefetched before each step."""

    paged = True


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit with state in CUDA managed memory, prefetched before each step."""

    paged = True


class PagedLion8bit(Lion8bit):
    """Lion8bit with state in CUDA managed memory, prefetched before each step."""

    paged = True

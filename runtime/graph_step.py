"""A training step (forward, loss, backward) captured once as a CUDA graph and replayed, with the
optimizer stepped eagerly after each replay, so that the model's hundreds of ops cost one launch on
the host.

An eager QLoRA step is bound by the host, not the GPU: every small op costs Python and launch time,
and the GPU waits for them (bench/RESULTS.md, "host time"). kbitc's ops never synchronize with the
host, so forward and backward can be captured:

    step = kbitc.lora.CudaGraphStep(lambda ids: lm_loss(model, ids), kbitc.lora.trainable_parameters(model),
                                    example_inputs=(ids,), optimizer=opt)
    for ids in batches:                 # same shapes and dtypes as the example
        loss = step(ids)                # copy in, replay, opt.step()

The optimizer step stays eager (any optimizer, kbitc's 8-bit ones and lr schedules included): it is
queued behind the replay, so its host time overlaps the graph's GPU time. Fixed at capture: input
shapes and dtypes, train / eval mode (dropout), and which parameters get gradients. Each call
overwrites the gradients (no accumulation across calls). The example inputs drive the warm-up and
the capture only; the parameters change only when the caller steps.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import torch

from kbitc.runtime.errors import KbitcError


class GraphStepError(KbitcError):
    """The step cannot be captured (not on CUDA, a host synchronization inside) or a call does not match it."""


def _set_sync_debug_mode(mode) -> None:
    with warnings.catch_warnings():  # "a prototype feature" on every call
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode(mode)


class CudaGraphStep:
    """loss_fn(*inputs) -> scalar loss and its backward into `params`' .grad as one CUDA graph; a call
    with new inputs replays it, steps `optimizer` (if given) and returns the new loss."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], params: Sequence[torch.nn.Parameter],
                 example_inputs: Sequence[torch.Tensor], optimizer: Optional[torch.optim.Optimizer] = None,
                 warmup: int = 2, check_sync: bool = True):
        self.params = list(params)
        if not self.params or not all(p.requires_grad for p in self.params):
            raise GraphStepError("expected a non-empty list of parameters that require grad")
        tensors = list(self.params) + list(example_inputs)
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
            devices = sorted({str(t.device) if isinstance(t, torch.Tensor) else type(t).__name__ for t in tensors})
            raise GraphStepError(f"a CUDA graph step needs the parameters and inputs as CUDA tensors, got {devices}")
        self.optimizer = optimizer
        self._inputs = [t.detach().clone() for t in example_inputs]
        self._graph = torch.cuda.CUDAGraph()
        self._warm_up(loss_fn, warmup, check_sync)
        try:
            with torch.cuda.graph(self._graph):
                loss = loss_fn(*self._inputs)
                loss.backward()
        except Exception as exc:
            for p in self.params:
                p.grad = None
            raise GraphStepError(f"the step could not be captured as a CUDA graph ({type(exc).__name__}: {exc}); "
                                 "torch's CUDA RNG may be unusable in this process after a failed capture"
                                 ) from exc
        self._loss = loss.detach()
        self._grads = [p.grad for p in self.params]
        missing = sum(g is None for g in self._grads)
        if missing:
            raise GraphStepError(f"{missing} of the {len(self.params)} parameters got no gradient from the loss")

    def _warm_up(self, loss_fn, warmup: int, check_sync: bool) -> None:
        """Run forward + backward a few times on a side stream before capture: lazy initialisation
        (cuBLAS workspaces, kernel attributes, autograd state) must not happen inside the capture. With
        check_sync the last run forbids host synchronization (torch's sync debug mode), so a step that
        cannot be captured fails here, cleanly: a capture that fails midway leaves torch's CUDA RNG
        unusable. (Code that skips its synchronizing checks while a capture runs, as Hugging Face's
        mask helpers do, needs check_sync=False; a kbitc program has no such branches.)"""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(0, warmup - 1)):
                loss_fn(*self._inputs).backward()
            previous = torch.cuda.get_sync_debug_mode()
            _set_sync_debug_mode("error" if check_sync else previous)
            try:
                loss_fn(*self._inputs).backward()
            except RuntimeError as exc:
                if "synchroniz" not in str(exc):
                    raise
                for p in self.params:
                    p.grad = None
                raise GraphStepError(f"the step synchronizes with the host ({exc}); a CUDA graph cannot hold "
                                     "that (.item(), .cpu(), printing a CUDA tensor, data-dependent shapes): "
                                     "remove it from the step or train eagerly") from exc
            finally:
                _set_sync_debug_mode(previous)
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None  # the captured backward allocates the gradients from the graph's pool

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One training step on `inputs` (same shapes and dtypes as the example); returns its loss."""
        if len(inputs) != len(self._inputs):
            raise GraphStepError(f"the step was captured with {len(self._inputs)} inputs, got {len(inputs)}")
        for i, (static, new) in enumerate(zip(self._inputs, inputs)):
            if new.shape != static.shape or new.dtype != static.dtype:
                raise GraphStepError(f"input {i}: the step was captured for {static.dtype} {list(static.shape)}, "
                                     f"got {new.dtype} {list(new.shape)}; capture another CudaGraphStep for it")
            static.copy_(new, non_blocking=True)
        self._graph.replay()
        for p, g in zip(self.params, self._grads):
            p.grad = g  # (again: the caller's zero_grad(set_to_none=True) drops them)
        if self.optimizer is not None:
            self.optimizer.step()
        return self._loss.clone()

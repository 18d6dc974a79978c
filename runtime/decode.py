"""Token-by-token decoding with an artifact's static-KV-cache program (compile --kv-cache N).

    decoder = kbitc.load("model.kbit", device="cuda").decoder(cuda_graph=True)
    logits = decoder.prefill(prompt_ids)          # [1, L, vocab]; fills cache positions 0 .. L-1
    logits = decoder.step(next_id)                # [1, vocab] for position L; one call per token

The decode program shares every weight with the loaded model (no copy), LoRA adapters attached to
it included (kbitc.lora.attach before decoder()); only the cache buffers are new. With
cuda_graph=True the one-token step is captured once and replayed: a replay costs one launch on the
host, so a step's time is the GPU's time. With compiled=True the step runs
through torch.compile first: Inductor fuses the many small ops between the kbitc kernels (norms,
rotary embedding, residual adds, activations), which otherwise cost one kernel launch each. The
prompt (prefill) always runs uncompiled, so prompts of any length cause no recompilation.
"""

from __future__ import annotations

from typing import Optional

import torch

from kbitc.runtime import lora
from kbitc.runtime.errors import KbitcError
from kbitc.runtime.manifest import ArtifactError
from kbitc.runtime.quant.state import FLOAT_DTYPES


class DecodeError(KbitcError):
    """The artifact has no decode program, or the cache is full."""


class Decoder:
    """Batch-1 generation state: the decode program, its cache, and the next free position."""

    def __init__(self, program: torch.nn.Module, max_cache_len: int, device: torch.device, cuda_graph: bool,
                 compiled: bool = False):
        if cuda_graph and device.type != "cuda":
            raise DecodeError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        self.program = program
        self._step_program = torch.compile(program, dynamic=False) if compiled else program
        self.max_cache_len = max_cache_len
        self.device = device
        self.length = 0
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._want_graph = cuda_graph

    def reset(self) -> None:
        """Start a new sequence (stale cache entries are masked by position, so nothing is cleared)."""
        self.length = 0

    def _check_room(self, count: int) -> None:
        if self.length + count > self.max_cache_len:
            raise DecodeError(f"the KV cache holds {self.max_cache_len} positions; {self.length} are used and "
                              f"{count} more were asked: compile with a larger --kv-cache, or reset()")

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ids [1, L] from position self.length; returns logits [1, L, vocab]."""
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise DecodeError(f"expected prompt ids of shape [1, L >= 1], got {list(ids.shape)}")
        self._check_room(ids.shape[1])
        positions = torch.arange(self.length, self.length + ids.shape[1], device=self.device)
        logits = self.program(input_ids=ids.to(self.device), cache_position=positions)["logits"]
        self.length += ids.shape[1]
        return logits

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One token (a tensor of one id) at position self.length; returns logits [1, vocab]."""
        self._check_room(1)
        if self._want_graph:
            if self._graph is None:
                self._capture()
            self._ids.copy_(token.reshape(1, 1))
            self._position.fill_(self.length)
            self._graph.replay()
            logits = self._logits.clone()  # the graph's output buffer is overwritten by the next step
        else:
            positions = torch.full((1,), self.length, dtype=torch.long, device=self.device)
            logits = self._step_program(input_ids=token.reshape(1, 1).to(self.device),
                                        cache_position=positions)["logits"]
        self.length += 1
        return logits[:, -1]

    def _capture(self) -> None:
        """Capture the one-token step on static inputs. Warm-up and capture write cache slot
        max_cache_len - 1 only, which a later step at that position overwrites before reading."""
        self._ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._position = torch.full((1,), self.max_cache_len - 1, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compilation, cuBLAS handles, allocator: all outside the capture
                self._step_program(input_ids=self._ids, cache_position=self._position)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._logits = self._step_program(input_ids=self._ids, cache_position=self._position)["logits"]


def load_decoder(model, cuda_graph: bool = False, compiled: bool = False) -> Decoder:
    """The decode program of a loaded artifact (kbitc.load), sharing the model's tensors."""
    from kbitc.runtime.loader import _assign_tensors, _retarget_devices

    info = model.kbitc_manifest.get("decode")
    if not info:
        raise DecodeError("this artifact has no decode program: compile it with --kv-cache N")
    if model.kbitc_path is None:
        raise DecodeError("the decode program is read from the artifact folder; load the model with kbitc.load")
    try:
        program = torch.export.load(str(model.kbitc_path / info["program"])).module()
    except Exception as exc:  # torch.export raises many types for a damaged archive
        raise ArtifactError(f"{model.kbitc_path / info['program']} could not be read ({type(exc).__name__}: "
                            f"{exc})") from exc
    tensors = dict(model.program.named_parameters(remove_duplicate=False))
    tensors.update(model.program.named_buffers(remove_duplicate=False))
    device = next(iter(tensors.values())).device
    _retarget_devices(program, device)
    prefix = info["prefix"]
    state = {}
    names = [n for n, _ in program.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in program.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in info["cache"]:
            dtype, shape = info["cache"][name]
            state[name] = torch.zeros(shape, dtype=FLOAT_DTYPES[dtype], device=device)
        elif name.removeprefix(prefix) in tensors:
            state[name] = tensors[name.removeprefix(prefix)]
        else:
            raise ArtifactError(f"the decode program reads {name}, which the loaded model does not hold")
    _assign_tensors(program, state)
    lora.share_adapters(model, program, prefix)
    return Decoder(program, int(info["max_cache_len"]), device, cuda_graph, compiled)

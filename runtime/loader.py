"""`kbitc.load`: verify an artifact, load (or rebuild) its kernels, and return an nn.Module.

Nothing is unpickled beyond torch.export's own weights-only format (the program holds no weights:
they come from safetensors), and a bundled binary runs only if its sha256 matches the manifest and
its ABI tag matches this interpreter; otherwise it is rebuilt from the bundled sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kbitc.runtime import build, dispatch, ops  # noqa: F401  (ops registers torch.ops.kbitc.*)
from kbitc.runtime.kernel_spec import KernelSpec
from kbitc.runtime.library import KernelLibrary
from kbitc.runtime.manifest import KERNELS, PROGRAM, WEIGHTS, ArtifactError, read_manifest, verify_files


def load(path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> torch.nn.Module:
    root = Path(path)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # the program's device arguments must name the index: torch.compile's metadata asserts compare
        # devices exactly ("cuda" != "cuda:0")
        device = torch.device("cuda", torch.cuda.current_device())
    _load_kernels(root, manifest, device)
    try:
        program = torch.export.load(str(root / PROGRAM))
    except Exception as exc:  # torch.export raises many types for a damaged archive
        raise ArtifactError(f"{root / PROGRAM} could not be read ({type(exc).__name__}: {exc})") from exc
    module = program.module()
    _retarget_devices(module, device)
    try:
        state = load_file(str(root / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{root / WEIGHTS} could not be read: {exc}") from exc
    for alias, name in manifest.get("tied_weights", {}).items():
        if name not in state:
            raise ArtifactError(f"tied weight {alias} points at {name}, which is not in {WEIGHTS}")
        state[alias] = state[name]
    _assign_tensors(module, state)
    return CompiledModel(module, manifest, root)


class Outputs(dict):
    """A program's dict output with attribute access too (`out.logits` and `out["logits"]`)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class CompiledModel(torch.nn.Module):
    """A loaded artifact: the rewritten program running kbitc ops, plus its manifest."""

    def __init__(self, program: torch.nn.Module, manifest: dict[str, Any], path: Path | None = None):
        super().__init__()
        self.program = program
        self.kbitc_manifest = manifest
        self.kbitc_path = path  # the artifact folder it was loaded from (kbitc.lora.merge reads it)

    def forward(self, *args, **kwargs):
        out = self.program(*args, **kwargs)
        return Outputs(out) if isinstance(out, dict) else out

    def decoder(self, cuda_graph: bool = False, compiled: bool = False):
        """Token-by-token generation with a static KV cache (an artifact compiled with --kv-cache N);
        see runtime/decode.py. cuda_graph=True (CUDA only) replays each step as one CUDA graph;
        compiled=True runs the step through torch.compile (fuses the ops between kbitc kernels)."""
        from kbitc.runtime.decode import load_decoder

        return load_decoder(self, cuda_graph, compiled)


def _load_kernels(root: Path, manifest: dict[str, Any], device: torch.device) -> None:
    info = manifest.get("kernels") or {}
    specs = [KernelSpec.from_json(s) for s in info.get("specs", [])]
    if not specs:
        return
    target_device = specs[0].device_type
    if target_device != device.type:
        raise ArtifactError(f"the artifact was compiled for {manifest.get('target')} ({target_device}) but "
                            f"device={device.type!r} was asked; compile with --target for that device")
    dispatch.check_target_runs_here(specs[0].target)
    is_cuda = target_device == "cuda"
    module_name = info["module_name"]
    bundled = root / info["library"]
    local_abi = build.abi_tag(is_cuda)
    differs = {k: (info.get("abi", {}).get(k), v) for k, v in local_abi.items()
               if k != "nvcc" and info.get("abi", {}).get(k) != v}
    if not differs:
        library_path = bundled
    else:
        sources = {p.name: p.read_text() for p in (root / KERNELS / "src").iterdir() if p.is_file()}
        try:
            library_path = build.build_library(module_name, sources, is_cuda, [s.name for s in specs])
        except build.ToolchainMissingError as exc:
            detail = ", ".join(f"{k}: built {a}, here {b}" for k, (a, b) in differs.items())
            raise ArtifactError(f"the bundled kernel library does not match this machine ({detail}) and it "
                                f"cannot be rebuilt here: {exc}") from exc
    dispatch.register_library(KernelLibrary(module_name, library_path, specs))


def _assign_tensors(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replace every (meta) parameter and buffer, persistent or not, by its tensor from the artifact."""
    params = dict(module.named_parameters(remove_duplicate=False))
    buffers = dict(module.named_buffers(remove_duplicate=False))
    expected = set(params) | set(buffers)
    if set(state) != expected:
        raise ArtifactError(f"weights and program disagree: missing {sorted(expected - set(state))[:5]}, "
                            f"unexpected {sorted(set(state) - expected)[:5]}")
    made: dict[int, torch.nn.Parameter] = {}  # tied weights share one Parameter
    for name, tensor in state.items():
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        if name in params:
            if id(tensor) not in made:
                made[id(tensor)] = torch.nn.Parameter(tensor, requires_grad=False)
            owner._parameters[attr] = made[id(tensor)]
        else:
            owner._buffers[attr] = tensor


def _retarget_devices(module: torch.nn.Module, device: torch.device) -> None:
    """The program was exported on the meta device, so ops that create tensors (arange, zeros, ...)
    carry device=meta; point them at the device the model is loaded on."""
    def fix(value):
        if isinstance(value, torch.device) and value.type == "meta":
            return device
        if isinstance(value, (list, tuple)):
            return type(value)(fix(v) for v in value)
        return value

    for sub in module.modules():
        if isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                node.args = fix(node.args)
                node.kwargs = {k: fix(v) for k, v in node.kwargs.items()}
            sub.recompile()

"""CompileConfig: every choice a compile makes, frozen and versioned (serialized into the manifest).

No environment variable changes numerics; what is not here does not influence the artifact.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path
from typing import Any, Optional

from kbitc.runtime.errors import KbitcError, UnsupportedInputError, expect
from kbitc.runtime.kernel_spec import CPU_TARGETS, CUDA_TARGETS
from kbitc.runtime.quant.state import ALLOWED_BLOCKSIZES_4BIT

CONFIG_VERSION = 1
SCHEMES = ("nf4", "fp4", "int8")
DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*.lm_head", "*wte*", "*wpe*")


class PlanFileError(KbitcError):
    """A --plan file is unreadable or names unknown settings."""


@dataclasses.dataclass(frozen=True)
class LayerOverride:
    """Settings for layers whose name matches `pattern` (fnmatch glob); None keeps the default."""

    pattern: str
    scheme: Optional[str] = None  # nf4 | fp4 | int8 | "skip" (keep 16-bit)
    blocksize: Optional[int] = None
    threshold: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class CompileConfig:
    target: str = "cpu"  # cpu (this machine's ISA), cpu_avx2, cpu_avx512, sm75 .. sm90
    scheme: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = ""  # activation dtype: f32 | bf16 | f16; "" = f32 on CPU, bf16 on CUDA
    threshold: float = 6.0  # int8 outlier threshold; 0 disables the decomposition
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    min_params: int = 4096  # smaller linears stay 16-bit: nothing to gain
    overrides: tuple[LayerOverride, ...] = ()
    trainable: bool = False  # also build the backward kernels (grad w.r.t. x) that LoRA training uses
    kv_cache: int = 0  # > 0: also export a decode program with a static KV cache of this many positions
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        targets = ("cpu",) + CPU_TARGETS + CUDA_TARGETS
        expect(self.target in targets, UnsupportedInputError,
               f"expected --target in {', '.join(targets)}, got {self.target!r}")
        expect(self.scheme in SCHEMES, UnsupportedInputError,
               f"expected a scheme in {SCHEMES}, got {self.scheme!r}")
        expect(self.blocksize in ALLOWED_BLOCKSIZES_4BIT, UnsupportedInputError,
               f"expected blocksize in {ALLOWED_BLOCKSIZES_4BIT}, got {self.blocksize}")
        expect(isinstance(self.kv_cache, int) and self.kv_cache >= 0, UnsupportedInputError,
               f"expected --kv-cache as a number of positions >= 0, got {self.kv_cache!r}")
        for o in self.overrides:
            expect(o.scheme in (None, "skip") + SCHEMES, UnsupportedInputError,
                   f"plan entry {o.pattern!r}: expected scheme in {SCHEMES + ('skip',)}, got {o.scheme!r}")
            expect(o.blocksize in (None,) + ALLOWED_BLOCKSIZES_4BIT, UnsupportedInputError,
                   f"plan entry {o.pattern!r}: expected blocksize in {ALLOWED_BLOCKSIZES_4BIT}, got {o.blocksize}")

    @property
    def is_cpu(self) -> bool:
        return self.target == "cpu" or self.target in CPU_TARGETS

    @property
    def activation_dtype(self) -> str:
        return self.compute_dtype or ("f32" if self.is_cpu else "bf16")

    def layer_settings(self, name: str) -> Optional[dict[str, Any]]:
        """Scheme, blocksize and threshold for layer `name`, or None to keep it 16-bit."""
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return None
        settings = {"scheme": self.scheme, "blocksize": self.blocksize, "threshold": self.threshold}
        excluded = any(fnmatch.fnmatchcase(name, p) for p in self.exclude)
        for o in self.overrides:  # later entries win
            if fnmatch.fnmatchcase(name, o.pattern):
                excluded = o.scheme == "skip"
                settings.update({k: v for k, v in dataclasses.asdict(o).items()
                                 if k != "pattern" and v is not None and v != "skip"})
        return None if excluded else settings

    def to_json(self) -> dict[str, Any]:
        return {"type": "kbitc.CompileConfig", "version": self.version,
                **{k: v for k, v in dataclasses.asdict(self).items() if k != "version"}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CompileConfig":
        expect(data.get("type") == "kbitc.CompileConfig" and data.get("version") == CONFIG_VERSION,
               UnsupportedInputError,
               f"expected a kbitc.CompileConfig of version {CONFIG_VERSION}, got "
               f"{data.get('type')} version {data.get('version')}")
        fields = {k: v for k, v in data.items() if k not in ("type", "version")}
        fields["include"] = tuple(fields.get("include", ("*",)))
        fields["exclude"] = tuple(fields.get("exclude", DEFAULT_EXCLUDE))
        fields["overrides"] = tuple(LayerOverride(**o) for o in fields.get("overrides", ()))
        return cls(**fields)


def load_plan(path: Path) -> tuple[LayerOverride, ...]:
    """Per-layer overrides from a JSON or YAML file: a list of {pattern, scheme, blocksize, threshold}
    or a mapping pattern -> scheme / settings."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanFileError(f"cannot read plan file {path}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml
        except ImportError as exc:
            raise PlanFileError(f"{path} is not JSON and PyYAML is not installed to read YAML") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PlanFileError(f"{path} is neither valid JSON nor YAML: {exc}") from exc
    if isinstance(data, dict):
        data = [{"pattern": k, **(v if isinstance(v, dict) else {"scheme": v})} for k, v in data.items()]
    if not isinstance(data, list):
        raise PlanFileError(f"expected a list or mapping of layer overrides in {path}, got {type(data).__name__}")
    overrides = []
    for entry in data:
        unknown = set(entry) - {"pattern", "scheme", "blocksize", "threshold"}
        if unknown or "pattern" not in entry:
            raise PlanFileError(f"plan entry {entry}: expected keys pattern, scheme, blocksize, threshold; "
                                f"unknown {sorted(unknown)}")
        overrides.append(LayerOverride(**entry))
    return tuple(overrides)

"""The artifact's manifest.json: format version, what went in, and the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kbitc.runtime.errors import KbitcError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
PROGRAM = "program.pt2"
DECODE_PROGRAM = "decode.pt2"  # optional: the static-KV-cache program (compile --kv-cache)
KERNELS = "kernels"


class ArtifactError(KbitcError):
    """A .kbit artifact is missing, corrupted, truncated or of an unsupported version."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest, keyed by relative POSIX path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"expected a .kbit artifact folder at {root}, found none")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{root} has no {MANIFEST}: not a kbitc artifact, or an interrupted copy") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is corrupted (invalid JSON: {exc}); recompile or re-copy the artifact") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"expected artifact format version {FORMAT_VERSION}, got {version}; "
                            "recompile the model with this kbitc version")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file exists with its recorded sha256, and nothing else is there."""
    expected: dict[str, str] = manifest.get("files", {})
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing:
        raise ArtifactError(f"artifact {root} is incomplete: missing {missing[:5]}")
    if extra:
        raise ArtifactError(f"artifact {root} holds files its manifest does not list: {extra[:5]}")
    for name, digest in expected.items():
        actual = sha256_file(root / name)
        if actual != digest:
            raise ArtifactError(f"{name} in {root} is corrupted or truncated (sha256 {actual[:12]}... "
                                f"!= {digest[:12]}... in the manifest); recompile or re-copy the artifact")

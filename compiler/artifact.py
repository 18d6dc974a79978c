"""Write a .kbit artifact: everything into a temporary folder, then one rename into place, so an
interrupted or failed compile leaves nothing at the output path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from kbitc.runtime.manifest import FORMAT_VERSION, MANIFEST, ArtifactError, hash_tree


@contextlib.contextmanager
def staging_folder(output: Path, force: bool) -> Iterator[Path]:
    """A private folder beside `output`; renamed to `output` only if the block succeeds."""
    if output.exists() and not force:
        raise ArtifactError(f"{output} already exists; pass --force (force=True) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        yield stage
        if output.exists():  # force: move the old one aside first, so the swap is quick
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            os.rename(output, old / "artifact")
            os.rename(stage, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(stage, output)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def write_manifest(stage: Path, fields: dict) -> None:
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": hash_tree(stage)}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))

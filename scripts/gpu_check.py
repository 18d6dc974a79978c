#!/usr/bin/env python3
"""Load artifacts compiled on another machine (--target smXX there) on this GPU machine and check
their logits against the CPU artifacts' logits computed there.

    python3 scripts/gpu_check.py FOLDER   # FOLDER: tiny-sm90-{nf4,int8}.kbit + expected_logits.pt

The carried artifacts were built with another Python ABI, so this exercises the loader's ABI check
and the rebuild from bundled sources for real.
"""

import json
import sys
import time
from pathlib import Path

import torch

import kbitc
from kbitc.runtime import build


def main(folder: Path) -> int:
    expected = torch.load(folder / "expected_logits.pt")
    ids = expected["ids"].cuda()
    failures = 0
    for scheme in ("nf4", "int8"):
        path = folder / f"tiny-sm90-{scheme}.kbit"
        built_abi = json.loads((path / "manifest.json").read_text())["kernels"]["abi"]
        start = time.perf_counter()
        model = kbitc.load(path, device="cuda")
        seconds = time.perf_counter() - start
        with torch.no_grad():
            got = model(input_ids=ids).logits.float().cpu()
        ref = expected[scheme]
        rel = float((got - ref).norm() / ref.norm())
        ok = rel < 3e-2 and torch.isfinite(got).all()
        failures += not ok
        print(f"{scheme}: built for python {built_abi['python']}, here {build.abi_tag(True)['python']}; "
              f"load (incl. rebuild) {seconds:.1f} s; relative L2 diff vs CPU float32 artifact {rel:.2e} "
              f"(bf16 compute on GPU) -> {'OK' if ok else 'FAIL'}")
    return failures


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))

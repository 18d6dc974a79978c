"""QLoRA on the bundled example: compile examples/tiny-llama-kjv to NF4 (with the backward kernels),
train LoRA adapters on a text it has never seen, and report the held-out perplexity before/after.

The default text is the free-software licenses Debian ships in /usr/share/common-licenses (GPL-3,
LGPL-3, Apache-2.0, MPL-2.0, GFDL-1.3, Artistic, BSD, CC0-1.0): real English prose far from the
King James Bible the model learned. Its last 10% is held out.

    python examples/finetune_lora.py [--text FILE] [--steps 200] [--out /tmp/kjv-lora] [--append-results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

import kbitc
from kbitc.runtime.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parent
LICENSES = ["GPL-3", "LGPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "BSD", "CC0-1.0"]


def default_text() -> str:
    folder = Path("/usr/share/common-licenses")
    files = [folder / name for name in LICENSES if (folder / name).is_file()]
    if not files:
        sys.exit("no /usr/share/common-licenses here: pass --text FILE")
    return "".join(f.read_text() for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--scheme", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--optimizer", default="adamw8bit")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="kjv-lora-")))
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    text = args.text.read_text() if args.text else default_text()
    artifact = kbitc.compile(ROOT / "tiny-llama-kjv", output=args.out / "model.kbit", scheme=args.scheme,
                             trainable=True, force=True)
    cfg = FinetuneConfig(r=16, alpha=32, dropout=0.05, steps=args.steps, lr=2e-3, batch_size=8, seq_len=128,
                         optimizer=args.optimizer)
    report = finetune(artifact, text, args.out / "adapters", cfg, progress=lambda it, **kw: tqdm(it, **kw))
    table = ("| model | scheme | text | steps | trainable params | held-out ppl before | after | tokens/s |\n"
             "|---|---|---|---|---|---|---|---|\n"
             f"| tiny-llama-kjv | {args.scheme} | {args.text.name if args.text else 'common-licenses'} "
             f"({report['train_tokens']} train / {report['heldout_tokens']} held-out tokens) | {cfg.steps} | "
             f"{report['trainable_params']} | {report['heldout_ppl_before']:.2f} | {report['heldout_ppl_after']:.2f} "
             f"| {report['tokens_per_s']:.0f} |")
    print(table)
    print(f"adapters: {args.out / 'adapters'}")
    if args.append_results:
        sys.path.insert(0, str(ROOT.parent / "bench"))
        from common import append_results

        append_results("QLoRA fine-tune of the example model (CPU)",
                       "python examples/finetune_lora.py " + " ".join(sys.argv[1:]),
                       table + f"\n\nr=16, alpha=32, dropout 0.05, {cfg.optimizer}, lr {cfg.lr} (warm-up + cosine), "
                       f"batch {cfg.batch_size} x {cfg.seq_len} tokens.")


if __name__ == "__main__":
    main()

"""QLoRA fine-tuning of a compiled causal LM on a text file: the loop behind `kbitc finetune`.

The frozen base runs kbitc's quantized ops (their backward passes gradients to the activations
only); LoRA adapters (runtime/lora.py) train with an 8-bit optimizer (runtime/optim). The text's
last `heldout_fraction` of tokens is never trained on and gives the perplexity before and after.
Ctrl-C saves a checkpoint (adapters + optimizer state + step + sampler state) that `resume` continues
exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from kbitc.runtime import lora
from kbitc.runtime.errors import KbitcError
from kbitc.runtime.graph_step import CudaGraphStep
from kbitc.runtime.generate import load_tokenizer
from kbitc.runtime.loader import load

CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
REPORT = "finetune_report.json"
OPTIMIZERS = ("adamw8bit", "adam8bit", "lion8bit", "paged_adamw8bit", "adamw")


class FinetuneError(KbitcError):
    """The fine-tune cannot run as asked (not a causal LM, text too short, bad checkpoint, ...)."""


@dataclasses.dataclass
class FinetuneConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: Optional[Sequence[str]] = None  # module-path globs; None = every quantized linear
    use_rslora: bool = False
    steps: int = 200
    lr: float = 2e-3
    batch_size: int = 8
    seq_len: int = 128
    optimizer: str = "adamw8bit"
    weight_decay: float = 0.0
    warmup_steps: int = 10
    heldout_fraction: float = 0.1
    eval_windows: int = 32
    seed: int = 0
    device: str = "cpu"
    cuda_graph: bool = False  # capture the step as one CUDA graph (runtime/graph_step.py); CUDA only
    compile: bool = False  # run the model through torch.compile (fuses the ops between kbitc kernels)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise FinetuneError(f"expected optimizer in {OPTIMIZERS}, got {self.optimizer!r}")
        if self.cuda_graph and not self.device.startswith("cuda"):
            raise FinetuneError(f"cuda_graph needs a CUDA device, got device={self.device!r}")
        if self.steps < 0 or self.batch_size < 1 or self.seq_len < 2 or not 0 < self.heldout_fraction < 1:
            raise FinetuneError("expected steps >= 0, batch_size >= 1, seq_len >= 2 and 0 < heldout_fraction < 1, "
                                f"got {self.steps}, {self.batch_size}, {self.seq_len}, {self.heldout_fraction}")


@dataclasses.dataclass
class TextSplit:
    """Token ids of one text: the first part for training, the tail held out."""

    train: torch.Tensor
    heldout: torch.Tensor

    @classmethod
    def from_text(cls, text: str, tokenizer, heldout_fraction: float, seq_len: int) -> "TextSplit":
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
        cut = int(len(ids) * (1 - heldout_fraction))
        split = cls(ids[:cut], ids[cut:])
        if len(split.train) <= seq_len + 1 or len(split.heldout) <= seq_len + 1:
            raise FinetuneError(f"the text has {len(ids)} tokens: too short for windows of {seq_len} tokens in "
                                f"both the training part and the held-out {heldout_fraction:.0%}; use a longer "
                                "text or a smaller --seq-len")
        return split

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(self.train) - seq_len, (batch_size,), generator=generator)
        return torch.stack([self.train[s: s + seq_len] for s in starts.tolist()])

    def heldout_windows(self, seq_len: int, limit: int) -> torch.Tensor:
        count = min(limit, len(self.heldout) // seq_len)
        return self.heldout[: count * seq_len].view(count, seq_len)


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a batch of windows."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: str, batch_size: int = 8) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        ids = windows[i: i + batch_size].to(device)
        nll += float(lm_loss(model, ids)) * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from kbitc.runtime import optim

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    cls = {"adamw8bit": optim.AdamW8bit, "adam8bit": optim.Adam8bit, "lion8bit": optim.Lion8bit,
           "paged_adamw8bit": optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr, weight_decay=weight_decay)


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warm-up, then cosine decay to 10%."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))


def save_checkpoint(folder: Path, model, optimizer, step: int, generator: torch.Generator,
                    cfg: FinetuneConfig, losses: list[float], ppl_before: float) -> Path:
    """Adapters (PEFT layout) + trainer state, written to a temporary folder and renamed into place."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    lora.save(model, tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg), "losses": losses,
                "heldout_ppl_before": ppl_before}, tmp / TRAINER_STATE)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


class _SigintFlag:
    """While active, the first Ctrl-C only sets `raised` (the loop stops between steps); a second one
    interrupts at once."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def finetune(artifact: str | Path, text: str, out: str | Path, cfg: FinetuneConfig,
             resume: Optional[str | Path] = None,
             progress: Callable = lambda iterable, **kw: iterable) -> dict:
    """Train LoRA adapters on `text`; save them to `out` (PEFT layout) with a report; returns the report.

    On Ctrl-C (after the step in flight) a resumable checkpoint is written to out/checkpoint and
    KeyboardInterrupt re-raised; `resume=out/checkpoint` continues bit for bit as if never stopped."""
    artifact, out = Path(artifact), Path(out)
    model = load(artifact, device=cfg.device)
    if not model.kbitc_manifest.get("is_causal_lm"):
        raise FinetuneError(f"{artifact} is not a causal language model")
    tokenizer = load_tokenizer(artifact)
    data = TextSplit.from_text(text, tokenizer, cfg.heldout_fraction, cfg.seq_len)
    windows = data.heldout_windows(cfg.seq_len, cfg.eval_windows)
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # adapter initialisation (kaiming-uniform A) and dropout
    state = None
    if resume is not None:
        state_file = Path(resume) / TRAINER_STATE
        if not state_file.is_file():
            raise FinetuneError(f"{resume} is not a kbitc finetune checkpoint (no {TRAINER_STATE})")
        state = torch.load(state_file, weights_only=True)
        lora.load(model, resume)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout continues as it would have
    else:
        lora.attach(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                    use_rslora=cfg.use_rslora)
    params = lora.trainable_parameters(model)
    if cfg.compile:  # in place (nn.Module.compile): model.program stays the GraphModule kbitc.lora works on
        model.compile()
    optimizer = make_optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    start = 0 if state is None else int(state["step"])
    losses: list[float] = [] if state is None else list(state["losses"])

    before = perplexity(model, windows, cfg.device) if state is None else float(state["heldout_ppl_before"])
    tokens = cfg.batch_size * cfg.seq_len
    done = start  # completed steps
    t0 = time.perf_counter()
    bar = progress(range(start, cfg.steps), initial=start, total=cfg.steps, desc="finetune", unit="step")
    graphed: Optional[CudaGraphStep] = None
    interrupted = _SigintFlag()
    try:
        with interrupted:
            for step in bar:
                if interrupted.raised:  # Ctrl-C waits for the step in flight, so the checkpoint is consistent
                    raise KeyboardInterrupt
                model.train()
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * _lr_factor(step, cfg)
                ids = data.batch(cfg.batch_size, cfg.seq_len, generator).to(cfg.device)
                if cfg.cuda_graph:  # forward + backward replayed as one graph, then the optimizer step
                    if graphed is None:
                        graphed = CudaGraphStep(lambda x: lm_loss(model, x), params, (ids,), optimizer=optimizer)
                    loss = graphed(ids)
                else:
                    loss = lm_loss(model, ids)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                losses.append(float(loss.detach()))
                done = step + 1
                if hasattr(bar, "set_postfix"):
                    rate = (done - start) * tokens / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}")
    except KeyboardInterrupt:
        path = save_checkpoint(out / CHECKPOINT, model, optimizer, done, generator, cfg, losses, before)
        raise KeyboardInterrupt(f"interrupted after step {done}; checkpoint saved to {path} "
                                f"(continue with --resume {path})") from None
    seconds = time.perf_counter() - t0
    after = perplexity(model, windows, cfg.device)
    lora.save(model, out)
    report = {"artifact": str(artifact), "steps": cfg.steps, "resumed_from_step": start,
              "train_tokens": len(data.train), "heldout_tokens": int(windows.numel()),
              "heldout_ppl_before": before, "heldout_ppl_after": after,
              "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
              "tokens_per_s": (cfg.steps - start) * tokens / seconds if seconds > 0 and cfg.steps > start else None,
              "seconds": seconds, "trainable_params": sum(p.numel() for p in params),
              "config": dataclasses.asdict(cfg)}
    (out / REPORT).write_text(json.dumps(report, indent=2, default=list))
    return report

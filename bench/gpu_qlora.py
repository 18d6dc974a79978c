"""QLoRA training throughput: kbitc vs bf16 LoRA (PEFT) vs bitsandbytes NF4 + PEFT, in one process.

A random-init LLaMA-style model (default: the 1B config, hidden 2048, intermediate 5632, 16 layers,
16 heads, vocab 32000; bf16; sdpa attention) is saved to a temporary folder (safetensors) and is the
source of all three contenders:

  kbitc          kbitc.compile(..., scheme="nf4", trainable=True, compute_dtype="bf16") -> kbitc.load
                 -> kbitc.lora.attach(r=16, alpha=32) on every quantized linear (the 7 projections)
  bf16 LoRA      the HF model in bf16 + peft LoraConfig(r=16, lora_alpha=32, the 7 projections)
  bnb + PEFT     the HF model loaded with BitsAndBytesConfig(nf4, double quant, compute bf16, quant
                 storage uint8) + the same LoraConfig (no prepare_model_for_kbit_training: it turns on
                 gradient checkpointing and fp32 norms, which a speed test of the same program must not)

Same everywhere: LoRA adapters in --adapter-dtype (default fp32, PEFT's default), lm_head and
embeddings 16-bit and frozen, no gradient checkpointing, one fixed seeded batch of random token ids,
the same manual causal-LM loss (logits[:, :-1] in fp32 vs ids[:, 1:]), the same optimizer type on
the adapters (--optimizer: torch AdamW, or kbitc AdamW8bit). A step = forward + backward +
optimizer step + zero_grad; --warmup steps, then --steps steps each timed with CUDA events (median
reported). Peak memory = torch.cuda.max_memory_allocated after the timed steps, reset before the
contender's warm-up (so it counts its weights, activations, grads and optimizer state). The loss of
the first step (adapters add exactly 0 then) must agree between kbitc and bitsandbytes within 2%.

    python bench/gpu_qlora.py --out-copy $OUT/qlora.md          # the 1B config on cuda
    python bench/gpu_qlora.py --tiny --device cpu --no-append --steps 2   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, append_results, environment_line  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, batch=4, seq=1024)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256, batch=2, seq=128)
NAMES = {"kbitc": "kbitc NF4 + kbitc.lora", "bf16": "bf16 LoRA (PEFT)", "bnb": "bitsandbytes NF4 + PEFT",
         "kbitc-graph": "kbitc NF4 + kbitc.lora, CUDA graph step", "bf16-graph": "bf16 LoRA (PEFT), CUDA graph step",
         "kbitc-compile-graph": "kbitc NF4 + kbitc.lora, torch.compile + CUDA graph step",
         "bf16-compile-graph": "bf16 LoRA (PEFT), torch.compile + CUDA graph step"}
GRAPH = "-graph"  # a contender name with this suffix runs its step through kbitc.lora.CudaGraphStep
COMPILE = "-compile"  # ... and this one (before -graph) runs the model through torch.compile
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {msg}", flush=True)


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def build_source(folder: Path, shape: dict, device: str, seed: int) -> int:
    """Random-init LlamaForCausalLM (bf16, seeded) saved as safetensors to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{k: v for k, v in shape.items() if k not in ("batch", "seq")}, use_cache=False,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):  # init on the GPU: seconds instead of a minute on the CPU for 1B params
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(str(folder), safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    free(device)
    log(f"source model: {n / 1e6:.1f}M params, saved to {folder} "
        f"({sum(f.stat().st_size for f in folder.glob('*.safetensors')) / 2**20:.0f} MiB)")
    return n


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (the same for every contender)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             ids[:, 1:].reshape(-1))


def make_optimizer(kind: str, params, lr: float):
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import kbitc

    return kbitc.optim.AdamW8bit(params, lr=lr)


# ---- contenders: each returns (model, trainable params); the model's forward(input_ids=) gives .logits


def make_kbitc(folder: Path, tmp: Path, args, adapter_dtype: torch.dtype):
    import kbitc

    if args.device.startswith("cuda"):
        major, minor = torch.cuda.get_device_capability(torch.device(args.device))
        target = f"sm{major}{minor}"
    else:
        target = "cpu"
    out = tmp / "m.kbit"
    if not out.exists():
        t = time.perf_counter()
        kbitc.compile(str(folder), output=out, target=target, scheme="nf4", trainable=True, compute_dtype="bf16",
                      progress=False)
        log(f"kbitc: compiled for {target} in {time.perf_counter() - t:.1f} s "
            f"(weights {(out / 'weights.safetensors').stat().st_size / 2**20:.0f} MiB)")
    t = time.perf_counter()
    model = kbitc.load(out, device=args.device)
    layers = kbitc.lora.attach(model, r=args.r, alpha=2 * args.r, dropout=0.0, dtype=adapter_dtype)
    log(f"kbitc: loaded + attached {len(layers)} adapters in {time.perf_counter() - t:.1f} s")
    return model, kbitc.lora.trainable_parameters(model)


def _peft(model, args, adapter_dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    for p in params:  # PEFT keeps fp32 adapters by default (autocast_adapter_dtype); make it explicit
        p.data = p.data.to(adapter_dtype)
    return model, params


def make_bf16(folder: Path, tmp: Path, args, adapter_dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(args.device)
    model, params = _peft(model, args, adapter_dtype)
    log(f"bf16: loaded + PEFT in {time.perf_counter() - t:.1f} s")
    return model, params


def make_bnb(folder: Path, tmp: Path, args, adapter_dtype: torch.dtype):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t = time.perf_counter()
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.uint8)
    device_map = {"": torch.device(args.device).index or 0} if args.device.startswith("cuda") else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 quantization_config=qcfg, device_map=device_map)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model, params = _peft(model, args, adapter_dtype)
    log(f"bnb: loaded ({n4} Linear4bit) + PEFT in {time.perf_counter() - t:.1f} s")
    return model, params


MAKERS = {"kbitc": make_kbitc, "bf16": make_bf16, "bnb": make_bnb}
CONTENDERS = list(MAKERS) + [b + GRAPH for b in ("kbitc", "bf16")] + [b + COMPILE + GRAPH for b in ("kbitc", "bf16")]


def run_contender(name: str, folder: Path, tmp: Path, args, ids: torch.Tensor, adapter_dtype: torch.dtype) -> dict:
    cuda = args.device.startswith("cuda")
    free(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, params = MAKERS[name.removesuffix(GRAPH).removesuffix(COMPILE)](folder, tmp, args, adapter_dtype)
    model.train()
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    n_train = sum(p.numel() for p in params)
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # PEFT forwards it to the HF model
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        raise RuntimeError(f"{name}: gradient checkpointing is on; this compares the same program without it")
    opt = make_optimizer(args.optimizer, params, args.lr)
    log(f"{name}: {n_train / 1e6:.2f}M trainable params ({params[0].dtype}), {_gib(weights_gib)} GiB allocated")

    def eager_step() -> torch.Tensor:
        loss = lm_loss(model(input_ids=ids).logits, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    step = eager_step
    if COMPILE in name:  # nn.Module.compile, in place: the kbitc model / the PEFT model
        model.compile()
    if name.endswith(GRAPH):  # forward + loss + backward replayed as one graph; opt.step() after it, eagerly
        import kbitc

        graphed = kbitc.lora.CudaGraphStep(lambda x: lm_loss(model(input_ids=x).logits, x), params, (ids,),
                                           optimizer=opt, check_sync=name.startswith("kbitc"))
        step = lambda: graphed(ids)  # noqa: E731
        log(f"{name}: captured the step in {time.perf_counter() - t:.1f} s")
    losses = [float(step()) for _ in range(args.warmup)]  # first = initial loss (fresh adapters add 0)
    sync(args.device)
    log(f"{name}: {args.warmup} warm-up steps in {time.perf_counter() - t:.1f} s, losses "
        + ", ".join(f"{x:.4f}" for x in losses))
    times = []
    for _ in range(args.steps):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            loss = step()
            times.append((time.perf_counter() - t0) * 1e3)
    final = float(loss)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    ms = statistics.median(times)
    tok_s = ids.numel() / (ms / 1e3)
    log(f"{name}: median {ms:.1f} ms/step (min {min(times):.1f}, max {max(times):.1f}), {tok_s:,.0f} tokens/s, "
        f"peak {_gib(peak)} GiB, loss {losses[0]:.4f} -> {final:.4f}")
    del opt, params, model
    free(args.device)
    return {"ms": ms, "min_ms": min(times), "tok_s": tok_s, "peak_gib": peak, "weights_gib": weights_gib,
            "initial_loss": losses[0] if losses else float("nan"), "final_loss": final, "trainable": n_train}


def _gib(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def table(results: dict) -> str:
    base = results.get("bf16")
    bnb = results.get("bnb")
    lines = ["| contender | ms/step | tokens/s | vs bf16 LoRA | vs bnb+PEFT | peak GiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        vs_bf16 = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "n/a"
        vs_bnb = f"{r['tok_s'] / bnb['tok_s']:.2f}x" if bnb else "n/a"
        lines.append(f"| {NAMES[name]} | {r['ms']:.1f} | {r['tok_s']:,.0f} | {vs_bf16} | {vs_bnb} | "
                     f"{_gib(r['peak_gib'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="hidden 256, 2 layers, vocab 1000, batch 2 x 128")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contenders", default="kbitc,kbitc-graph,bf16,bf16-graph,bnb",
                        help="comma-separated; a -graph suffix captures the step as a CUDA graph (CUDA only)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, help="override the batch size")
    parser.add_argument("--seq", type=int, help="override the sequence length")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    parser.add_argument("--adapter-dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--optimizer", choices=["adamw", "kbitc_adamw8bit"], default="adamw",
                        help="the same optimizer type on the adapters of every contender")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--out-copy", type=Path, help="also write the results section to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (source + artifact)")
    args = parser.parse_args()
    shape = dict(TINY if args.tiny else FULL)
    shape["batch"] = args.batch or shape["batch"]
    shape["seq"] = args.seq or shape["seq"]
    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; expected some of {CONTENDERS}")
    if args.device.startswith("cuda"):
        assert torch.cuda.is_available(), "--device cuda needs a CUDA GPU (use --device cpu --tiny to smoke-test)"
        device_name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        device_name = "CPU"
    adapter_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.adapter_dtype]
    log(f"device {device_name}; torch {torch.__version__}, transformers {_version('transformers')}, "
        f"peft {_version('peft')}, bitsandbytes {_version('bitsandbytes')}, kbitc {_version('kbitc')}")

    tmp = Path(tempfile.mkdtemp(prefix="kbitc-qlora-"))
    folder = tmp / "source"
    results: dict = {}
    n_params = 0
    try:
        n_params = build_source(folder, shape, args.device, args.seed)
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, shape["vocab_size"], (shape["batch"], shape["seq"]), generator=g).to(args.device)
        for name in names:
            log(f"--- {name} ---")
            try:
                results[name] = run_contender(name, folder, tmp, args, ids, adapter_dtype)
            except Exception:  # keep the other contenders' numbers
                print(f"!!! {name} failed:", flush=True)
                traceback.print_exc()
                sys.stderr.flush()
                free(args.device)
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    if not results:
        print("no contender finished", flush=True)
        sys.exit(1)
    losses = ", ".join(f"{n} {r['initial_loss']:.4f}" for n, r in results.items())
    print(f"initial losses (same batch, fresh adapters): {losses}", flush=True)
    check_ok = None
    if "kbitc" in results and "bnb" in results:
        rel = abs(results["kbitc"]["initial_loss"] - results["bnb"]["initial_loss"]) / results["bnb"]["initial_loss"]
        check_ok = rel < 0.02
        print(f"|kbitc - bnb| / bnb initial loss = {rel:.2e} ({'ok' if check_ok else 'FAIL'}: < 2%)", flush=True)

    tbl = table(results)
    n = shape["batch"] * shape["seq"]
    config = "tiny config" if args.tiny else "1B LLaMA-style config"
    title = (f"QLoRA training throughput, {config} (hidden {shape['hidden_size']}, intermediate "
             f"{shape['intermediate_size']}, {shape['num_hidden_layers']} layers, {n_params / 1e6:.0f}M params, {shape['num_attention_heads']} "
             f"heads, vocab {shape['vocab_size']}, random init), batch {shape['batch']} x {shape['seq']}, "
             f"r={args.r} on all 7 projections ({device_name}; transformers {_version('transformers')}, "
             f"peft {_version('peft')}, bitsandbytes {_version('bitsandbytes')})")
    notes = (f"One step = forward + backward + optimizer step on {n} tokens; median of {args.steps} steps after "
             f"{args.warmup} warm-up steps ({'CUDA events' if args.device.startswith('cuda') else 'wall clock'}). "
             f"Adapters {args.adapter_dtype} (alpha {2 * args.r}, dropout 0), optimizer "
             f"{'torch.optim.AdamW' if args.optimizer == 'adamw' else 'kbitc.optim.AdamW8bit'} (lr {args.lr}) on the "
             "adapters for every contender; no gradient checkpointing; lm_head and embeddings bf16, frozen; loss = "
             "fp32 cross entropy of logits[:, :-1] computed the same way for all. Peak = "
             "torch.cuda.max_memory_allocated over warm-up + timed steps (weights included). bitsandbytes: "
             "BitsAndBytesConfig(nf4, double quant, compute bf16, quant storage uint8) via from_pretrained, no "
             "prepare_model_for_kbit_training. Initial loss on the same batch: " + losses +
             ("" if check_ok is None else f" (kbitc vs bnb within 2%: {'yes' if check_ok else 'NO'})") +
             ". Memory allocated after building (weights + adapters): " +
             ", ".join(f"{k} {_gib(r['weights_gib'])} GiB" for k, r in results.items()) + ".")
    body = tbl + "\n\n" + notes
    command = "python bench/gpu_qlora.py " + " ".join(sys.argv[1:])
    if args.no_append:
        section = f"\n## {title}\n\n{environment_line()}  \nCommand: `{command}`\n\n{body}\n"
        print(section, flush=True)
    else:
        before = RESULTS.stat().st_size if RESULTS.exists() else 0
        append_results(title, command, body)
        section = RESULTS.read_bytes()[before:].decode()
    if args.out_copy is not None:
        args.out_copy.parent.mkdir(parents=True, exist_ok=True)
        args.out_copy.write_text(section)
        log(f"wrote {args.out_copy}")
    if check_ok is False:
        sys.exit(2)


if __name__ == "__main__":
    main()

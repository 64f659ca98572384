"""peftsum vs the usual Hugging Face loop (`peft` + transformers), side by side on identical work, on this machine.

    python benchmarks/bench.py                     # training, compile break-even, generation, whole run; BENCHMARKS.md
    python benchmarks/bench.py --precision fp32    # both sides in fp32 (a CPU without native bf16 does this by itself)
    python benchmarks/bench.py --methods lora --no-generation --no-whole-run --repeats 1
    python benchmarks/bench.py --profile lora      # where one peftsum training step spends its time

Fair on every kind of hardware: each side runs at its best precision for the machine (bf16 autocast where bf16 is
native: a GPU, a CPU with AVX512-BF16 or AMX; fp32 elsewhere), and MFU is measured against the matmul peak of the dtype
actually computed in, measured in the same run in a few seconds. Identical work: the embedded SmolLM2-135M,
../shared/data/xsum train examples in the same seeded order, the same token ids (peftsum's template and truncation),
batch size, max length, AdamW settings, constant learning rate and seed. Each (side, method) trains in a fresh
subprocess with an empty inductor cache (so peak memory is its own, and a compile is cold, as on a new machine); the
sides alternate, and `--repeats` runs it all again in the other order, so the ratios come with their spread. Tokens/s
counts real tokens only. Both sides then score the same 32 validation examples with their own loss code; the losses
must agree within 2% or the speed-up does not count. peftsum trains as `train.compile auto` does for a long run on
this hardware (compiled on a GPU and on a CPU in bf16, plain on a CPU in fp32), and once the other way, for the
compile break-even. The whole run is `peftsum compare --config configs/demo.yaml`
against the same comparison written as the usual loop. The measured part of BENCHMARKS.md for this machine's kind is
rewritten; other kinds' tables stay.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "xsum"
DEMO_DATA = ROOT.parent / "shared" / "data" / "cnn_dailymail"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
LR = {"lora": 5e-4, "prompt": 3e-2, "finetune": 5e-5}
PROMPT_TEXT = "Summarize the following article in one or two sentences:"
PEER_EVAL_BATCH = 16  # the usual loop's generation batch
TABLES_END = "<!-- measured tables: end -->"
LOADS: list[float] = []  # the 1-minute load average before and after each worker (the machine may be shared)


def markers(key: str) -> tuple[str, str]:
    return f"<!-- measured: {key} start -->", f"<!-- measured: {key} end -->"


# ---------------------------------------------------------------- hardware and precision

def pick(args):
    """(device, dtype) of this run: --device / --precision, auto = the best for the hardware."""

    from peftsum.core.models import compute_dtype, pick_device

    device = pick_device(args.device)
    return device, compute_dtype(args.precision, device)


def hardware_kind(device, dtype) -> tuple[str, str]:
    """(key, title) of this machine's kind: which table of BENCHMARKS.md it measures."""
    import torch

    from peftsum.core.session import cpu_name

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"cuda-{name.lower().replace(' ', '-')}-{precision}", f"GPU: {name}, {precision}"
    if torch.cpu._is_amx_tile_supported():
        kind, what = "amx", "AMX (native bf16 matmuls)"
    elif torch.cpu._is_avx512_bf16_supported():
        kind, what = "avx512bf16", "AVX-512 with AVX512-BF16 (native bf16 dot products), no AMX"
    elif torch.backends.cpu.get_cpu_capability() == "AVX512":
        kind, what = "avx512", "AVX-512 without bf16"
    else:
        kind, what = "avx2", "AVX2, no AVX-512 (bf16 emulated)"
    return f"cpu-{kind}-{precision}", f"CPU: {cpu_name()}, {os.cpu_count()} cores, {what}; at {precision}"


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def matmul_peak_tflops(device, dtype, seconds: float = 0.4) -> float:
    """The best matmul rate in `dtype` over this model's layer shapes and a square one, each timed for `seconds`:
    a few seconds in all, whatever the dtype (an emulated bf16 is slow, not long to measure)."""
    import torch

    shapes = ((8192, 8192, 8192),) if device.type == "cuda" else (
        (2048, 2048, 2048), (2048, 576, 1536), (2048, 1536, 576), (2048, 576, 960))
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        sync(device)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - started) / 1e12)
    return best


def flops_per_token(config: dict, max_length: int) -> float:
    """Model FLOPs per real token of one training step (the same definition on both sides and every machine).

    Forward: 2 x the blocks' matmul parameters + attention scores (2 x 2 x T x d per layer, T ~ max_length / 2 on
    average over causal positions). Backward: 1x the forward (input gradients only: the blocks are frozen for all
    three methods). The LM head is left out: it runs at summary positions only (< 5% here).
    """
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * d // config["num_attention_heads"]
    matmul_params = layers * (d * d * 2 + d * kv * 2 + 3 * d * ffn)
    forward = 2 * matmul_params + layers * 4 * (max_length / 2) * d
    return forward * 2


# ---------------------------------------------------------------- worker set-up

def setup(args):
    import torch

    from peftsum.config import load_config
    from peftsum.core.data import load_data
    from peftsum.core.models import load_model
    from peftsum.core.prompts import encode_example

    cfg = load_config(None, {
        "data.source": str(DATA), "data.train_size": str(args.steps * args.batch_size),
        "data.train_eval_size": "0", "data.eval_size": "32", "data.max_length": str(args.max_length),
        "data.format": "plain",  # BENCHMARKS.md's figures were measured on plain-format examples
        "lora.dropout": "0", "lora.lr": str(LR["lora"]), "prompt.lr": str(LR["prompt"]),
        "finetune.lr": str(LR["finetune"]), "prompt.init_text": PROMPT_TEXT, "train.schedule": "constant",
        "train.warmup_ratio": "0", "train.max_grad_norm": "0", "train.epochs": "1",
        "train.batch_size": str(args.batch_size), "methods": args.method, "model.precision": args.precision,
    })
    torch.manual_seed(0)
    loaded = load_model(cfg.model)
    splits = load_data(cfg.data, seed=0)
    reserved = 10 if args.method == "prompt" else 0
    train = [encode_example(loaded.tokenizer, e, cfg.data, reserved) for e in splits.train]
    held_out = [encode_example(loaded.tokenizer, e, cfg.data, reserved) for e in splits.eval]
    batches = [list(range(i, i + args.batch_size)) for i in range(0, len(train), args.batch_size)]
    return cfg, loaded, train, held_out, batches


def _timed_steps(args, device, batches, step) -> dict:
    """Run `step(indices)` over the batches; tokens/s over the steps after the warmup, the first step's time."""
    tokens, seconds, first_step = 0, 0.0, 0.0
    for number, indices in enumerate(batches):
        sync(device)
        started = time.perf_counter()
        real = step(indices)
        sync(device)
        elapsed = time.perf_counter() - started
        if number == 0:
            first_step = elapsed  # with a cold compile, this holds the compilation
        if number >= args.warmup_steps:
            seconds, tokens = seconds + elapsed, tokens + real
    return {"tokens_per_s": tokens / seconds, "first_step_s": first_step}


def run_peftsum(args) -> dict:
    """peftsum's training step as `train` runs it: joined/compiled blocks, the summary-only LM head, fused AdamW."""
    import torch

    from peftsum.core.forward import autocast, collate, summary_loss
    from peftsum.core.session import Session, fresh_adapted
    from peftsum.fast.compiled import training_blocks
    from peftsum.training.train import fused_update, make_optimizer

    cfg, loaded, train, held_out, batches = setup(args)
    device, dtype = pick(args)
    loaded.model.to(device)
    adapted = fresh_adapted(Session(cfg, loaded, device, dtype, progress=False), args.method)
    optimizer = make_optimizer(adapted.trainable, cfg.method_lr(args.method), 0.0,
                               fused=fused_update(device, dtype, args.compile))
    pad = loaded.tokenizer.pad_token_id
    adapted.model.train()

    def step(indices):
        examples = [train[i] for i in indices]
        batch = {k: v.to(device) for k, v in collate(examples, pad).items()}
        count = sum(sum(label != -100 for label in e.labels[1:]) for e in examples)
        with autocast(device, dtype):
            loss_sum, _ = summary_loss(adapted, batch, count)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(len(e.input_ids) for e in examples)

    with training_blocks(adapted.model, device, args.max_length, compile=args.compile):
        result = _timed_steps(args, device, batches, step)
    adapted.model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, dtype):
        for i in range(0, len(held_out), args.batch_size):
            batch = {k: v.to(device) for k, v in collate(held_out[i:i + args.batch_size], pad).items()}
            loss_sum, n = summary_loss(adapted, batch)
            total, count = total + loss_sum.item(), count + n
    return {**result, "eval_loss": total / count, "peak_memory_mb": peak_memory_mb(device),
            "config": loaded.model.config.to_dict()}


def peer_model(loaded, method: str, cfg):
    """The usual set-up: peft (or requires_grad on the head) on the fp32 transformers model."""
    import peft

    model = loaded.model
    if method == "lora":
        return peft.get_peft_model(model, peft.LoraConfig(
            task_type="CAUSAL_LM", r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if method == "prompt":
        return peft.get_peft_model(model, peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=cfg.prompt.num_virtual_tokens, prompt_tuning_init="TEXT",
            prompt_tuning_init_text=cfg.prompt.init_text, tokenizer_name_or_path=loaded.source))
    model.requires_grad_(False)
    model.get_output_embeddings().weight.requires_grad_(True)
    return model


def peer_autocast(device, dtype):
    import contextlib

    import torch

    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def pad_right(examples, pad_id, device):
    import torch

    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id)
    labels = torch.full((len(examples), length), -100)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
        mask[row, :len(e.input_ids)] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def peer_loss(model, examples, pad_id, device, dtype):
    """The model's own loss (a mean over its label tokens) and the number of those tokens."""
    ids, mask, labels = pad_right(examples, pad_id, device)
    with peer_autocast(device, dtype):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    return loss, int((labels[:, 1:] != -100).sum())


def run_peer(args) -> dict:
    """The usual loop: peft (or requires_grad on the head), fp32 weights, autocast at the machine's best precision,
    labels into the model, AdamW."""
    import torch

    cfg, loaded, train, held_out, batches = setup(args)
    device, dtype = pick(args)
    loaded.model.to(device)
    torch.manual_seed(cfg.train.seed)
    model = peer_model(loaded, args.method, cfg)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.method_lr(args.method))
    pad = loaded.tokenizer.pad_token_id
    model.train()

    def step(indices):
        loss, _ = peer_loss(model, [train[i] for i in indices], pad, device, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(len(train[i].input_ids) for i in indices)

    result = _timed_steps(args, device, batches, step)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held_out), args.batch_size):
            loss, n = peer_loss(model, held_out[i:i + args.batch_size], pad, device, dtype)
            total, count = total + loss.item() * n, count + n
    return {**result, "eval_loss": total / count, "peak_memory_mb": peak_memory_mb(device)}


# ---------------------------------------------------------------- generation

def time_forwards(model, device) -> dict:
    """Time the model's forward calls, split into prefill (several positions) and decoding (one position); and
    peftsum's, which run outside the model's forward where decode.py covers the model."""
    from peftsum.fast.decode import LeanDecoder

    times = {"prefill_s": 0.0, "decode_s": 0.0}

    def timed(real, key_of):
        def call(*args, **kwargs):
            sync(device)
            started = time.perf_counter()
            out = real(*args, **kwargs)
            sync(device)
            times[key_of(*args, **kwargs)] += time.perf_counter() - started
            return out
        return call

    def forward_key(*args, **kwargs):
        given = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        return "prefill_s" if given.shape[1] > 1 else "decode_s"

    model.forward = timed(model.forward, forward_key)
    LeanDecoder.prefill = timed(LeanDecoder.prefill, lambda *args, **kwargs: "prefill_s")
    LeanDecoder.__call__ = timed(LeanDecoder.__call__, lambda *args, **kwargs: "decode_s")
    return times


def peer_generate(model, tokenizer, prompts, batch_size, max_new_tokens, no_repeat, device, dtype, stop_ids=None):
    """Batched `generate` in data-set order, as a plain loop over a DataLoader would, ending at EOS (or any of
    `stop_ids`: the chat format's end of turn too)."""
    import torch

    predictions = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer.pad({"input_ids": prompts[i:i + batch_size]}, return_tensors="pt").to(device)
        with torch.no_grad(), peer_autocast(device, dtype):
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    no_repeat_ngram_size=no_repeat, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=list(stop_ids) if stop_ids else tokenizer.eos_token_id)
        predictions += [t.strip() for t in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True)]
    return predictions


def run_generation(args) -> dict:
    """Summaries/s of peftsum's evaluation vs the peer's batched generate, same 64 documents, same max_new_tokens."""
    from peftsum.config import load_config
    from peftsum.core.data import load_data
    from peftsum.core.models import load_model
    from peftsum.core.prompts import prompt_format
    from peftsum.evaluation.evaluate import generate
    from peftsum.evaluation.metrics import rouge_summary
    from peftsum.methods.base import untouched

    device, dtype = pick(args)
    overrides = {"data.source": str(DATA), "data.format": "plain", "data.train_eval_size": "0",
                 "data.eval_size": "64", "eval.max_new_tokens": str(args.max_new_tokens),
                 "eval.no_repeat_ngram_size": "0"}
    if args.eval_batch_size:  # else peftsum's default
        overrides["eval.batch_size"] = str(args.eval_batch_size)
    overrides["eval.quantize"] = args.quantize
    cfg = load_config(None, overrides)
    loaded = load_model(cfg.model)
    loaded.model.to(device)
    examples = load_data(cfg.data, seed=0).eval
    documents, references = [e.document for e in examples], [e.summary for e in examples]
    times = time_forwards(loaded.model, device)
    started = time.perf_counter()
    if args.side == "peftsum":
        adapted = untouched(loaded.model, dtype)
        predictions = generate(adapted, loaded.tokenizer, documents, cfg.data, cfg.eval, device, dtype)
    else:
        fmt = prompt_format(loaded.tokenizer, cfg.data)  # the prompts peftsum makes (plain format, above)
        prompts = [fmt.prompt(d, fmt.budget(cfg.data)) for d in documents]
        predictions = peer_generate(loaded.model, loaded.tokenizer, prompts, cfg.eval.batch_size,
                                    args.max_new_tokens, 0, device, dtype)
    seconds = time.perf_counter() - started
    return {"summaries_per_s": len(documents) / seconds, "seconds": seconds, **times,
            "rouge1": rouge_summary(predictions, references, samples=1000)["rouge1"],
            "peak_memory_mb": peak_memory_mb(device), "batch_size": cfg.eval.batch_size}


# ---------------------------------------------------------------- the whole run

def demo_config(args):
    from peftsum.config import load_config

    return load_config(DEMO_CONFIG, {"data.source": str(DEMO_DATA), "model.precision": args.precision,
                                     "model.device": args.device})


def run_whole_peftsum(args) -> dict:
    """`peftsum compare --config configs/demo.yaml` as a user runs it (train.compile auto, defaults)."""
    from peftsum.cli import main

    with tempfile.TemporaryDirectory() as out:
        code = main(["compare", "--config", str(DEMO_CONFIG), "--data", str(DEMO_DATA), "--out", out,
                     "--precision", args.precision, "--device", args.device])
        results = json.loads((Path(out) / "results.json").read_text())
    if code != 0:
        raise SystemExit(f"peftsum compare failed ({code})")
    rouge = {name: m["after"]["eval"]["rouge"]["rouge1"]["mean"] for name, m in results["methods"].items()}
    rouge["base"] = results["baseline"]["eval"]["rouge"]["rouge1"]["mean"]
    compiled = {name: m["training"].get("compiled") for name, m in results["methods"].items()}
    return {"rouge1": rouge, "compiled": compiled, "peak_memory_mb": peak_memory_mb(pick(args)[0])}


def run_whole_peer(args) -> dict:
    """The demo's comparison written as the usual loop: the untouched model scored, then each method trained (peft,
    shuffled batches, warmup + linear decay, clipping, AdamW) and scored, with `generate` at batch 16 and the model's
    own loss. The same data, settings, token ids and decoding as `peftsum compare --config configs/demo.yaml`."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from peftsum.core.data import load_data
    from peftsum.core.models import load_model
    from peftsum.core.prompts import prompt_format
    from peftsum.evaluation.metrics import rouge_summary

    cfg = demo_config(args)
    device, dtype = pick(args)
    splits = load_data(cfg.data, seed=cfg.train.seed)

    def fresh():  # the usual loop loads the pretrained model for each run
        loaded = load_model(cfg.model)
        loaded.model.to(device)
        return loaded

    loaded = fresh()
    tokenizer, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id
    fmt = prompt_format(tokenizer, cfg.data)  # the demo's format (auto: chat for the instruct default), as peftsum

    def score(model, reserved: int) -> float:
        model.eval()
        rouge = None
        for examples in (splits.train_eval, splits.eval):
            encoded = [fmt.example(e, cfg.data, reserved=reserved) for e in examples]
            with torch.no_grad():
                for i in range(0, len(encoded), cfg.eval.batch_size):
                    peer_loss(model, encoded[i:i + cfg.eval.batch_size], pad, device, dtype)
            prompts = [fmt.prompt(e.document, fmt.budget(cfg.data, reserved=reserved)) for e in examples]
            predictions = peer_generate(model, tokenizer, prompts, PEER_EVAL_BATCH, cfg.eval.max_new_tokens,
                                        cfg.eval.no_repeat_ngram_size, device, dtype, fmt.stop_ids)
            rouge = rouge_summary(predictions, [e.summary for e in examples], samples=cfg.eval.bootstrap_samples)
        return rouge["rouge1"]["mean"]  # the eval split's

    scores = {"base": score(loaded.model, 0)}
    for method in cfg.methods:
        del loaded
        loaded = fresh()
        torch.manual_seed(cfg.train.seed)
        model = peer_model(loaded, method, cfg)
        reserved = cfg.prompt.num_virtual_tokens if method == "prompt" else 0
        train = [fmt.example(e, cfg.data, reserved=reserved) for e in splits.train]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.method_lr(method), weight_decay=cfg.train.weight_decay)
        steps = -(-len(train) // cfg.train.batch_size) * cfg.train.epochs
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * steps), steps)
        model.train()
        for epoch in range(cfg.train.epochs):
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch)).tolist()
            for i in range(0, len(order), cfg.train.batch_size):
                loss, _ = peer_loss(model, [train[j] for j in order[i:i + cfg.train.batch_size]], pad, device, dtype)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        scores[method] = score(model, reserved)
        del model, optimizer, scheduler
    return {"rouge1": scores, "peak_memory_mb": peak_memory_mb(device)}


# ---------------------------------------------------------------- profile

def profile(args) -> None:
    """Print where one peftsum training step spends its time (after a few warm steps), by kind of work."""
    import torch._inductor.config as inductor
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from peftsum.core.forward import autocast, collate, summary_loss
    from peftsum.core.session import Session, fresh_adapted
    from peftsum.fast.compiled import training_blocks
    from peftsum.training.train import fused_update, make_optimizer

    inductor.cpp.enable_kernel_profile = True  # the fused kernels by name, not one "graph" entry
    args.method, args.steps = args.profile, max(args.steps, 4)
    cfg, loaded, train, _, batches = setup(args)
    device, dtype = pick(args)
    loaded.model.to(device)
    adapted = fresh_adapted(Session(cfg, loaded, device, dtype, progress=False), args.method)
    optimizer = make_optimizer(adapted.trainable, 1e-4, 0.0, fused=fused_update(device, dtype, args.compile))
    adapted.model.train()

    def step(indices):
        examples = [train[i] for i in indices]
        batch = {k: v.to(device) for k, v in collate(examples, loaded.tokenizer.pad_token_id).items()}
        with autocast(device, dtype):
            loss_sum, count = summary_loss(adapted, batch)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with training_blocks(adapted.model, device, args.max_length, compile=args.compile):
        for indices in batches[:3]:
            step(indices)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            started = time.perf_counter()
            step(batches[3])
            sync(device)
            elapsed = time.perf_counter() - started
    kinds = {"matmuls (mm, bmm, addmm)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
             "attention (SDPA)": ("aten::_scaled_dot_product", "aten::_flash_attention"),
             "optimizer": ("aten::_fused_adamw", "aten::_foreach"),
             "LM-head softmax and loss": ("aten::_log_softmax", "aten::nll_loss")}
    shares = dict.fromkeys([*kinds, "fused element-wise kernels (inductor)", "other"], 0.0)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    for event in events:
        kind = next((k for k, names in kinds.items() if event.key.startswith(names)), None)
        if kind is None:
            kind = "fused element-wise kernels (inductor)" if "cpp_fused" in event.key else "other"
        shares[kind] += event.self_cpu_time_total / 1e6
    total = sum(shares.values())
    print(f"one {args.method} step, batch {args.batch_size} x {args.max_length}, {dtype}, "
          f"{'compiled' if args.compile else 'plain'}: {elapsed:.2f} s (load {os.getloadavg()[0]:.1f})\n")
    print("| share | seconds | what |\n|---|---|---|")
    for kind, seconds in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"| {100 * seconds / total:.0f}% | {seconds:.3f} | {kind} |")
    print("\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


# ---------------------------------------------------------------- driver

def worker_main(args) -> None:
    if args.what == "generate":
        result = run_generation(args)
    elif args.what == "whole":
        result = (run_whole_peftsum if args.side == "peftsum" else run_whole_peer)(args)
    else:
        result = (run_peftsum if args.side == "peftsum" else run_peer)(args)
    print("RESULT " + json.dumps(result))


def spawn(side: str, what: str, method: str, args, compile: bool = True, eval_batch_size: int = 0,
          quantize: str = "none") -> dict:
    command = [sys.executable, __file__, "--worker", "--side", side, "--what", what, "--method", method,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--warmup-steps", str(args.warmup_steps), "--max-new-tokens", str(args.max_new_tokens),
               "--compile" if compile else "--no-compile", "--eval-batch-size", str(eval_batch_size),
               "--precision", args.precision, "--device", args.device, "--quantize", quantize]
    LOADS.append(os.getloadavg()[0])
    with tempfile.TemporaryDirectory() as cache:
        # An empty inductor cache per run: the first step's time is a cold compile, as on a new machine.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": cache}
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{side} {what} {method} failed:\n{result.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    LOADS.append(os.getloadavg()[0])
    out["wall_s"] = wall
    variant = (" compiled" if compile else " plain") if side == "peftsum" and what == "train" else ""
    print(f"  {side} {what} {method}{variant}: "
          + ", ".join(f"{k} {v:.3g}" for k, v in out.items() if isinstance(v, float)), flush=True)
    return out


def spread(values: list[float], digits: str = ".2f", unit: str = "x") -> str:
    """Median, with the range over the repeats when there are several."""
    middle = f"{statistics.median(values):{digits}}{unit}"
    if len(values) == 1:
        return middle
    return f"{middle} ({min(values):{digits}}-{max(values):{digits}})"


def training_tables(args, peak: float, repeats: list[dict]) -> str:
    rows, compile_rows = [], []
    for method in args.methods.split(","):
        runs = [r[method] for r in repeats]
        ours, peer = [r["peftsum"] for r in runs], [r["peer"] for r in runs]
        flops = flops_per_token(ours[0]["config"], args.max_length)
        ratios = [o["tokens_per_s"] / p["tokens_per_s"] for o, p in zip(ours, peer)]
        mfu = [o["tokens_per_s"] * flops / (peak * 1e12) for o in ours]
        peer_mfu = [p["tokens_per_s"] * flops / (peak * 1e12) for p in peer]
        agree = all(abs(o["eval_loss"] - p["eval_loss"]) / p["eval_loss"] <= 0.02 for o, p in zip(ours, peer))
        rows.append(
            f"| {method} | {statistics.median(p['tokens_per_s'] for p in peer):.0f} | "
            f"{statistics.median(o['tokens_per_s'] for o in ours):.0f} | **{spread(ratios)}** | "
            f"{spread([100 * m for m in mfu], '.0f', '%')} | {spread([100 * m for m in peer_mfu], '.0f', '%')} | "
            f"{peer[0]['eval_loss']:.4f} / {ours[0]['eval_loss']:.4f} | {'yes' if agree else 'NO'} | "
            f"{max(p['peak_memory_mb'] for p in peer):.0f} / {max(o['peak_memory_mb'] for o in ours):.0f} | "
            f"{statistics.median(p['first_step_s'] for p in peer):.1f} / "
            f"{statistics.median(o['first_step_s'] for o in ours):.1f} |")
        other = [r.get("plain" if args.compile else "compiled") for r in runs]
        if all(other):
            plain, compiled = (other, ours) if args.compile else (ours, other)
            plain_tps = statistics.median(p["tokens_per_s"] for p in plain)
            compiled_tps = statistics.median(o["tokens_per_s"] for o in compiled)
            cost = statistics.median(o["first_step_s"] for o in compiled) - statistics.median(
                p["first_step_s"] for p in plain)
            saving = 1 / plain_tps - 1 / compiled_tps  # seconds saved per token once compiled
            even = f"{cost / saving:,.0f}" if saving > 0 else "never"
            compile_rows.append(f"| {method} | {plain_tps:.0f} | {compiled_tps:.0f} | "
                                f"{compiled_tps / plain_tps:.2f}x | {cost:.0f} | {even} |")
    table = (
        f"#### Training ({len(repeats)} repeat(s) of {args.steps} steps of batch {args.batch_size}, max length "
        f"{args.max_length}, first {args.warmup_steps} steps untimed; median, range over the repeats; peftsum "
        f"{'compiled' if args.compile else 'plain, not compiled'}: what `train.compile auto` picks here for a long "
        "run)\n\n"
        "| method | peer tokens/s | peftsum tokens/s | ratio | peftsum MFU | peer MFU | eval loss peer / peftsum | "
        "loss within 2% | peak memory peer / peftsum (MB) | first step peer / peftsum (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    if compile_rows:
        table += (
            "\n#### Compiling: when it pays (peftsum compiled vs plain, the same steps; cold compile = first step "
            "compiled minus first step plain)\n\n"
            "| method | plain tokens/s | compiled tokens/s | speed-up | cold compile (s) | break-even (tokens) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(compile_rows) + "\n")
    return table


def generation_table(args, runs: dict) -> str:
    r = lambda x: f"{x['rouge1']['mean']:.1f} [{x['rouge1']['low']:.1f}, {x['rouge1']['high']:.1f}]"  # noqa: E731
    peer_at = {runs[k]["batch_size"]: runs[k] for k in runs if k.startswith("peer")}
    lines = []
    for name, x in runs.items():
        same = peer_at.get(x["batch_size"])
        other = x["seconds"] - x["prefill_s"] - x["decode_s"]
        lines.append(
            f"| {name} | {x['batch_size']} | {x['summaries_per_s']:.2f} | "
            f"**{x['summaries_per_s'] / peer_at[PEER_EVAL_BATCH]['summaries_per_s']:.2f}x** | "
            f"{x['summaries_per_s'] / same['summaries_per_s']:.2f}x | {x['prefill_s']:.1f} / {x['decode_s']:.1f} / "
            f"{other:.1f} | {r(x)} | {x['peak_memory_mb']:.0f} |")
    return (
        "\n#### Evaluation generation (untouched model, 64 XSum validation documents, greedy, "
        f"max {args.max_new_tokens} new tokens)\n\n"
        f"| | batch | summaries/s | vs peer at {PEER_EVAL_BATCH} | vs peer at the same batch | prefill / decode / "
        "other (s) | ROUGE-1 [95% CI] | peak memory (MB) |\n|---|---|---|---|---|---|---|---|\n"
        + "\n".join(lines) + "\n")


def whole_table(peer: dict, ours: dict) -> str:
    compiled = ", ".join(n for n, c in ours["compiled"].items() if c) or "none"
    rouge = lambda x: ", ".join(f"{k} {v:.1f}" for k, v in x["rouge1"].items())  # noqa: E731
    return (
        "\n#### Whole run: the demo comparison (`configs/demo.yaml` on ../shared/data/cnn_dailymail: untouched model "
        "and three methods trained and scored), each side in a fresh process with an empty compile cache\n\n"
        "| | wall time | ratio | peak memory (MB) | eval ROUGE-1 |\n|---|---|---|---|---|\n"
        f"| peer: the same comparison as the usual loop | {peer['wall_s'] / 60:.1f} min | **1.00x** | "
        f"{peer['peak_memory_mb']:.0f} | {rouge(peer)} |\n"
        f"| `peftsum compare` (defaults; compiled: {compiled}) | {ours['wall_s'] / 60:.1f} min | "
        f"**{peer['wall_s'] / ours['wall_s']:.2f}x** | {ours['peak_memory_mb']:.0f} | {rouge(ours)} |\n")


def write_section(out: Path, key: str, text: str) -> None:
    """Replace this kind's measured section of BENCHMARKS.md (or add it before the end of the tables)."""
    start, end = markers(key)
    old = out.read_text() if out.is_file() else f"# Benchmarks\n\n{TABLES_END}\n"
    section = f"{start}\n{text}{end}"
    if start in old:
        head, rest = old.split(start, 1)
        new = head + section + rest.split(end, 1)[1]
    elif TABLES_END in old:
        head, rest = old.split(TABLES_END, 1)
        new = f"{head}{section}\n\n{TABLES_END}{rest}"
    else:
        new = f"{old.rstrip()}\n\n{section}\n"
    out.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,prompt,finetune")
    parser.add_argument("--steps", type=int, default=0, help="steps per worker (default 16; 30 on a GPU)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2, help="training runs per side, in alternating order")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch (default 8; 64 on a GPU)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="both sides' precision (auto: bf16 where the hardware has it natively)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--no-whole-run", action="store_true")
    parser.add_argument("--no-break-even", action="store_true",
                        help="skip peftsum's runs the other way (plain where it compiles, compiled where it does not)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="peftsum with compiled blocks (default: what train.compile auto picks for a long run "
                             "on this hardware)")
    parser.add_argument("--profile", metavar="METHOD", help="profile one peftsum training step of METHOD")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--what", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--eval-batch-size", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--quantize", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA} (the shared XSum sample)")
    import torch

    device, dtype = pick(args)
    gpu = device.type == "cuda"
    args.steps = args.steps or (30 if gpu else 16)
    args.batch_size = args.batch_size or (64 if gpu else 8)
    if args.compile is None:  # the default's speed: what `train.compile auto` does for a run past the break-even
        from peftsum.fast.compiled import should_compile
        args.compile = should_compile("auto", device, None, dtype=dtype)
    if args.profile:
        return profile(args)
    key, title = hardware_kind(device, dtype)
    peak = matmul_peak_tflops(device, dtype)
    fp32_peak = peak if dtype == torch.float32 else matmul_peak_tflops(device, torch.float32)
    LOADS.append(os.getloadavg()[0])
    repeats = []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1} of {args.repeats}", flush=True)
        runs = {}
        for method in args.methods.split(","):
            sides = ["peer", "peftsum"] if repeat % 2 == 0 else ["peftsum", "peer"]
            runs[method] = {side: spawn(side, "train", method, args, compile=args.compile) for side in sides}
            if not args.no_break_even:
                other = "plain" if args.compile else "compiled"
                runs[method][other] = spawn("peftsum", "train", method, args, compile=not args.compile)
        repeats.append(runs)
    text = training_tables(args, peak, repeats)
    if not args.no_generation:
        generation = {
            f"peer: `generate`, data-set order, fp32 weights{'' if dtype == torch.float32 else ' + bf16 autocast'}":
                spawn("peer", "generate", "none", args, eval_batch_size=PEER_EVAL_BATCH),
            "peer at peftsum's default batch": spawn("peer", "generate", "none", args, eval_batch_size=64),
            "peftsum (default batch): length-sorted batches, own greedy loop": spawn("peftsum", "generate", "none", args),
            "peftsum at the peer's batch": spawn("peftsum", "generate", "none", args, eval_batch_size=PEER_EVAL_BATCH),
        }
        if device.type == "cpu":
            generation["peftsum, `eval.quantize int8`"] = spawn("peftsum", "generate", "none", args, quantize="int8")
        text += generation_table(args, generation)
    if not args.no_whole_run:
        peer_whole = spawn("peer", "whole", "none", args)
        ours_whole = spawn("peftsum", "whole", "none", args)
        text += whole_table(peer_whole, ours_whole)
    precision = "fp32" if dtype == torch.float32 else "bf16 (peer: bf16 autocast over fp32 weights; peftsum: bf16 " \
                                                      "frozen weights, fp32 trainable ones)"
    head = (f"### {title}\n\n"
            f"{platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads. Both sides in "
            f"{precision}. Measured matmul peak: "
            f"{peak:.3f} TFLOP/s in {str(dtype).replace('torch.', '')}"
            + (f" (fp32: {fp32_peak:.3f})" if dtype != torch.float32 else "")
            + f", what MFU is taken against. 1-minute load average {min(LOADS):.1f}-{max(LOADS):.1f} over the run "
            f"(measured before and after each worker). Command: `python benchmarks/bench.py "
            f"{' '.join(sys.argv[1:])}`.\n\n")
    write_section(Path(args.out), key, head + text)
    print(head + text)
    print(f"written to {args.out} (section {key})")


if __name__ == "__main__":
    main()

"""peftsum vs the usual Hugging Face loop (`peft` + transformers, bf16 autocast), side by side on identical work.

    python benchmarks/bench.py                  # all methods, 30 steps each, plus generation; writes BENCHMARKS.md
    python benchmarks/bench.py --steps 10 --methods lora --no-generation

Identical work: the embedded SmolLM2-135M, ../shared/data/xsum train examples in the same seeded order, the same
token ids (peftsum's template and truncation), batch size, max length, AdamW settings, constant learning rate and
seed. Each (side, method) trains in a fresh subprocess, so peak RSS is its own. Tokens/s counts real tokens only.
Both sides then score the same 32 validation examples with their own loss code; the losses must agree within 2%
or the speed-up does not count. Model FLOP/s is reported against this machine's bf16 matmul peak, measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "xsum"
LR = {"lora": 5e-4, "prompt": 3e-2, "finetune": 5e-5}
PROMPT_TEXT = "Summarize the following article in one or two sentences:"
START, END = "<!-- measured: start -->", "<!-- measured: end -->"
PEER_EVAL_BATCH = 16


# ---------------------------------------------------------------- shared set-up (worker side)

def setup(args):
    import torch

    from peftsum.config import load_config
    from peftsum.data import load_data
    from peftsum.prompts import encode_example
    from peftsum.models import load_model

    cfg = load_config(None, {
        "data.source": str(DATA), "data.train_size": str(args.steps * args.batch_size),
        "data.train_eval_size": "0", "data.eval_size": "32", "data.max_length": str(args.max_length),
        "data.format": "plain",  # BENCHMARKS.md's figures were measured on plain-format examples
        "lora.dropout": "0", "lora.lr": str(LR["lora"]), "prompt.lr": str(LR["prompt"]),
        "finetune.lr": str(LR["finetune"]), "prompt.init_text": PROMPT_TEXT, "train.schedule": "constant",
        "train.warmup_ratio": "0", "train.max_grad_norm": "0", "train.epochs": "1",
        "train.batch_size": str(args.batch_size), "methods": args.method,
    })
    torch.manual_seed(0)
    loaded = load_model(cfg.model)
    splits = load_data(cfg.data, seed=0)
    reserved = 10 if args.method == "prompt" else 0
    train = [encode_example(loaded.tokenizer, e, cfg.data, reserved) for e in splits.train]
    held_out = [encode_example(loaded.tokenizer, e, cfg.data, reserved) for e in splits.eval]
    batches = [list(range(i, i + args.batch_size)) for i in range(0, len(train), args.batch_size)]
    return cfg, loaded, train, held_out, batches


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_peftsum(args) -> dict:
    import torch

    from peftsum.session import Session, fresh_adapted
    from peftsum.compiled import compiled_blocks
    from peftsum.forward import autocast, collate, summary_loss
    from peftsum.models import compute_dtype, pick_device

    cfg, loaded, train, held_out, batches = setup(args)
    device = pick_device("auto")
    dtype = compute_dtype("auto", device)
    session = Session(cfg, loaded, device, dtype, progress=False)
    adapted = fresh_adapted(session, args.method)
    optimizer = torch.optim.AdamW(adapted.trainable, lr=cfg.method_lr(args.method))
    adapted.model.train()
    tokens, seconds, first_step = 0, 0.0, 0.0
    with compiled_blocks(adapted.model, device, args.max_length, enabled=args.compile):
        for step, indices in enumerate(batches):
            batch = collate([train[i] for i in indices], loaded.tokenizer.pad_token_id)
            started = time.perf_counter()
            with autocast(device, dtype):
                loss_sum, count = summary_loss(adapted, batch)
            (loss_sum / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == 0:
                first_step = time.perf_counter() - started  # with --compile, this holds the compilation
            if step >= args.warmup_steps:
                seconds += time.perf_counter() - started
                tokens += int(batch["attention_mask"].sum())
    adapted.model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast(device, dtype):
        for i in range(0, len(held_out), args.batch_size):
            loss_sum, n = summary_loss(adapted, collate(held_out[i:i + args.batch_size], loaded.tokenizer.pad_token_id))
            total, count = total + loss_sum.item(), count + n
    return {"tokens_per_s": tokens / seconds, "eval_loss": total / count, "peak_rss_mb": peak_rss_mb(),
            "params": adapted.parameter_counts(), "first_step_s": first_step}


def run_peer(args) -> dict:
    """The usual loop: peft (or requires_grad on the head), fp32 weights, bf16 autocast, labels into the model."""
    import peft
    import torch

    cfg, loaded, train, held_out, batches = setup(args)
    model = loaded.model
    tokenizer = loaded.tokenizer
    torch.manual_seed(cfg.train.seed)
    if args.method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    elif args.method == "prompt":
        model = peft.get_peft_model(model, peft.PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=10, prompt_tuning_init="TEXT",
            prompt_tuning_init_text=PROMPT_TEXT, tokenizer_name_or_path=loaded.source))
    else:
        model.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.method_lr(args.method))

    def pad_right(examples):
        length = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), length), tokenizer.pad_token_id)
        labels = torch.full((len(examples), length), -100)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[row, :len(e.labels)] = torch.tensor(e.labels)
            mask[row, :len(e.input_ids)] = 1
        return ids, mask, labels

    def mean_loss(examples):
        # The model's own loss is a mean over its label tokens; weight it back to a sum for a per-token average.
        ids, mask, labels = pad_right(examples)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return loss, int((labels[:, 1:] != -100).sum())

    model.train()
    tokens, seconds, first_step = 0, 0.0, 0.0
    for step, indices in enumerate(batches):
        started = time.perf_counter()
        loss, _ = mean_loss([train[i] for i in indices])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            first_step = time.perf_counter() - started
        if step >= args.warmup_steps:
            seconds += time.perf_counter() - started
            tokens += sum(len(train[i].input_ids) for i in indices)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(held_out), args.batch_size):
            loss, n = mean_loss(held_out[i:i + args.batch_size])
            total, count = total + loss.item() * n, count + n
    return {"tokens_per_s": tokens / seconds, "eval_loss": total / count, "peak_rss_mb": peak_rss_mb(),
            "first_step_s": first_step}


def run_generation(args) -> dict:
    """Summaries/s of peftsum's evaluation vs the peer's batched generate, same 64 documents, same max_new_tokens."""
    import torch

    from peftsum.config import load_config
    from peftsum.data import load_data
    from peftsum.prompts import prompt_format
    from peftsum.evaluate import generate
    from peftsum.methods import untouched
    from peftsum.metrics import rouge_summary
    from peftsum.models import compute_dtype, load_model

    overrides = {"data.source": str(DATA), "data.format": "plain", "data.train_eval_size": "0",
                 "data.eval_size": "64",
                 "eval.max_new_tokens": str(args.max_new_tokens), "eval.no_repeat_ngram_size": "0"}
    if args.eval_batch_size:  # else peftsum's default
        overrides["eval.batch_size"] = str(args.eval_batch_size)
    cfg = load_config(None, overrides)
    loaded = load_model(cfg.model)
    examples = load_data(cfg.data, seed=0).eval
    documents, references = [e.document for e in examples], [e.summary for e in examples]
    device, dtype = torch.device("cpu"), compute_dtype("auto", torch.device("cpu"))
    out = {}
    if args.side == "peftsum":
        adapted = untouched(loaded.model, dtype)
        started = time.perf_counter()
        predictions = generate(adapted, loaded.tokenizer, documents, cfg.data, cfg.eval, device, dtype)
        seconds = time.perf_counter() - started
    else:
        tokenizer, model = loaded.tokenizer, loaded.model
        fmt = prompt_format(tokenizer, cfg.data)  # the prompts peftsum makes, in the same format
        prompts = [fmt.prompt(d, fmt.budget(cfg.data)) for d in documents]
        predictions = []
        started = time.perf_counter()
        size = cfg.eval.batch_size
        for i in range(0, len(prompts), size):  # data-set order, as a plain loop over a DataLoader would
            chunk = prompts[i:i + size]
            batch = tokenizer.pad({"input_ids": chunk}, return_tensors="pt")  # left padding
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                output = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=list(fmt.stop_ids))
            predictions += [t.strip() for t in tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:],
                                                                      skip_special_tokens=True)]
        seconds = time.perf_counter() - started
    out["summaries_per_s"] = len(documents) / seconds
    out["rouge1"] = rouge_summary(predictions, references, samples=1000)["rouge1"]
    out["peak_rss_mb"] = peak_rss_mb()
    out["batch_size"] = cfg.eval.batch_size
    return out


# ---------------------------------------------------------------- driver

def matmul_peak_tflops() -> float:
    """The best bf16 matmul rate over a square shape and this model's own layer shapes (best of 5 each)."""
    import torch

    best = 0.0
    for m, k, n in ((4096, 4096, 4096), (2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576)):
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        a @ b
        for _ in range(5):
            started = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - started) / 1e12)
    return best


def flops_per_token(method: str, max_length: int) -> float:
    """Model FLOPs per real token for one training step of SmolLM2-135M (30 layers, d=576, ffn 1536, 3 kv heads).

    Forward: 2 x matmul parameters of the blocks + attention scores (2 x 2 x T x d per layer, T ~ max_length / 2
    on average over causal positions). Backward: 2x the forward where weights train everywhere, 1x (input
    gradients only) for frozen blocks; the LM head is ignored (it runs at summary positions only: < 5% here).
    """
    d, ffn, layers, kv = 576, 1536, 30, 192
    matmul_params = layers * (d * d * 2 + d * kv * 2 + 3 * d * ffn)
    forward = 2 * matmul_params + layers * 4 * (max_length / 2) * d
    return forward * 2  # forward + input-gradient backward (frozen blocks for all three methods)


def worker_main(args) -> None:
    result = run_generation(args) if args.what == "generate" else (run_peftsum if args.side == "peftsum" else run_peer)(args)
    print("RESULT " + json.dumps(result))


def spawn(side: str, what: str, method: str, args, eval_batch_size: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", "--side", side, "--what", what, "--method", method,
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
               "--warmup-steps", str(args.warmup_steps), "--max-new-tokens", str(args.max_new_tokens),
               "--compile" if args.compile else "--no-compile", "--eval-batch-size", str(eval_batch_size)]
    with tempfile.TemporaryDirectory() as cache:
        # An empty inductor cache per run: the first step's time is a cold compile, as on a new machine.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": cache}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"{side} {what} {method} failed:\n{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,prompt,finetune")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="peftsum with --compile (train.compile), which pays off for runs of more than a minute or two")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--what", default="train", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--eval-batch-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    if not DATA.is_dir():
        raise SystemExit(f"needs {DATA} (the shared XSum sample)")

    import torch

    peak = matmul_peak_tflops()
    rows = []
    for method in args.methods.split(","):
        ours, peer = spawn("peftsum", "train", method, args), spawn("peer", "train", method, args)
        agree = abs(ours["eval_loss"] - peer["eval_loss"]) / peer["eval_loss"] <= 0.02
        mfu = ours["tokens_per_s"] * flops_per_token(method, args.max_length) / (peak * 1e12)
        rows.append(f"| {method} | {peer['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} | "
                    f"**{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x** | {peer['eval_loss']:.4f} | "
                    f"{ours['eval_loss']:.4f} | {'yes' if agree else 'NO'} | {peer['peak_rss_mb']:.0f} | "
                    f"{ours['peak_rss_mb']:.0f} | {100 * mfu:.1f}% | {peer['first_step_s']:.1f} | "
                    f"{ours['first_step_s']:.1f} |")
        print(rows[-1], flush=True)
    generation = ""
    if not args.no_generation:
        # The peer at the batch size of the usual loop; peftsum at its default and, like for like, at the peer's.
        peer = spawn("peer", "generate", "none", args, eval_batch_size=PEER_EVAL_BATCH)
        ours = spawn("peftsum", "generate", "none", args)
        ours_same = spawn("peftsum", "generate", "none", args, eval_batch_size=PEER_EVAL_BATCH)
        r = lambda x: f"{x['rouge1']['mean']:.1f} [{x['rouge1']['low']:.1f}, {x['rouge1']['high']:.1f}]"  # noqa: E731

        def row(name, x):
            return (f"| {name} | {x['batch_size']} | {x['summaries_per_s']:.2f} | "
                    f"**{x['summaries_per_s'] / peer['summaries_per_s']:.2f}x** | {r(x)} | {x['peak_rss_mb']:.0f} |\n")
        generation = (
            "\n### Evaluation generation (untouched model, 64 XSum validation documents, greedy, "
            f"max {args.max_new_tokens} new tokens)\n\n"
            "| | batch | summaries/s | ratio | ROUGE-1 [95% CI] | peak RSS (MB) |\n|---|---|---|---|---|---|\n"
            + row("peer: `generate`, data-set order, fp32 weights + bf16 autocast", peer)
            + row("peftsum (default batch): length-sorted batches, bf16 weights, own greedy loop", ours)
            + row("peftsum at the peer's batch", ours_same))
        print(generation)
    table = (
        f"## Training ({args.steps} steps of batch {args.batch_size}, max length {args.max_length}, first "
        f"{args.warmup_steps} steps untimed)\n\n"
        "| method | peer tokens/s | peftsum tokens/s | ratio | peer eval loss | peftsum eval loss | loss within 2% | "
        "peer peak RSS (MB) | peftsum peak RSS (MB) | peftsum MFU | peer first step (s) | peftsum first step (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    from peftsum.session import cpu_name

    machine = (f"Machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}; torch {torch.__version__}, "
               f"threads {torch.get_num_threads()}; measured bf16 matmul peak {peak:.2f} TFLOP/s (best over four "
               f"shapes). Command: `python benchmarks/bench.py {' '.join(sys.argv[1:])}`.\n")
    tables = f"{START}\n{machine}\n{table}{generation}{END}"
    out = Path(args.out)
    old = out.read_text() if out.is_file() else f"# Benchmarks: peftsum vs Hugging Face peft\n\n{START}\n{END}\n"
    # Only the measured part is replaced: the analysis written around it stays.
    head, rest = old.split(START, 1) if START in old else (old + "\n", END)
    out.write_text(head + tables + rest.split(END, 1)[1])
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

"""Find each method's defaults by measurement: train every trial on the same token budget, score it on a validation
split, print one table per question (learning rate, targets, initialisation, template, decoding...).

    python benchmarks/tune.py --data ../shared/data/xsum --out runs/tune-xsum            # every trial
    python benchmarks/tune.py --data ../shared/data/xsum --only lora-all-1e-3,decode-beam4  # a few

Each trial is a `peftsum compare` of one method into OUT/<trial> (finished trials are read back, so the script
resumes); decoding trials re-score a trained trial with other generation settings. A token budget (not seconds)
makes the trials comparable across machines: the numbers in docs/defaults.md came from a GPU, and the same budget
on this repository's 2-core CPU takes about 800 s of training per trial. Only validation splits are scored: the
choices must not be fitted to anything a comparison later reports as unseen... except that split itself, which is
the honest caveat of any tuning on a validation set (docs/defaults.md says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftsum.config import load_config  # noqa: E402
from peftsum.core.data import load_data  # noqa: E402
from peftsum.core.session import open_session  # noqa: E402
from peftsum.evaluation.evaluate import evaluate  # noqa: E402
from peftsum.infra.runs import RUN_CONFIG  # noqa: E402
from peftsum.methods import adapters  # noqa: E402
from peftsum.methods.base import adapt, untouched  # noqa: E402
from peftsum.methods.registry import method_named  # noqa: E402
from peftsum.study.compare import compare  # noqa: E402

INSTRUCTION = "Summarize the following text in one sentence.\n\n{document}\n\nSummary:"
CHAT = {"data.format": "chat"}
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# (question, trial name, method, overrides). The first trial of the list also scores the untouched model.
TRIALS = [
    ("LoRA learning rate and targets", "lora-attn-5e-4", "lora", {"lora.lr": 5e-4}),
    ("LoRA learning rate and targets", "lora-attn-2e-3", "lora", {"lora.lr": 2e-3}),
    ("LoRA learning rate and targets", "lora-all-5e-4", "lora", {"lora.lr": 5e-4, "lora.targets": ALL_LINEAR}),
    ("LoRA learning rate and targets", "lora-all-1e-3", "lora", {"lora.lr": 1e-3, "lora.targets": ALL_LINEAR}),
    ("LoRA learning rate and targets", "lora-all-2e-3", "lora", {"lora.lr": 2e-3, "lora.targets": ALL_LINEAR}),
    ("LoRA rank", "lora-all-1e-3-r32", "lora",
     {"lora.lr": 1e-3, "lora.targets": ALL_LINEAR, "lora.rank": 32, "lora.alpha": 64}),
    ("Soft prompt learning rate and initialisation", "prompt-text-3e-2", "prompt", {"prompt.lr": 3e-2}),
    ("Soft prompt learning rate and initialisation", "prompt-text-1e-1", "prompt", {"prompt.lr": 1e-1}),
    ("Soft prompt learning rate and initialisation", "prompt-text-3e-1", "prompt", {"prompt.lr": 3e-1}),
    ("Soft prompt learning rate and initialisation", "prompt-random-1e-1", "prompt",
     {"prompt.lr": 1e-1, "prompt.init": "random"}),
    ("Soft prompt length", "prompt-text-1e-1-v30", "prompt", {"prompt.lr": 1e-1, "prompt.num_virtual_tokens": 30}),
    ("Fine-tuning: what to unfreeze and learning rate", "finetune-head-5e-5", "finetune", {"finetune.lr": 5e-5}),
    ("Fine-tuning: what to unfreeze and learning rate", "finetune-head-5e-4", "finetune", {"finetune.lr": 5e-4}),
    ("Fine-tuning: what to unfreeze and learning rate", "finetune-head-last2-2e-4", "finetune",
     {"finetune.lr": 2e-4, "finetune.last_blocks": 2}),
    ("Fine-tuning: what to unfreeze and learning rate", "finetune-last2-2e-4", "finetune",
     {"finetune.lr": 2e-4, "finetune.last_blocks": 2, "finetune.head": False}),
    ("Fine-tuning: what to unfreeze and learning rate", "finetune-last4-1e-4", "finetune",
     {"finetune.lr": 1e-4, "finetune.last_blocks": 4, "finetune.head": False}),
    # The newer methods and LoRA options, on a small CPU budget (--budget-tokens 24000 --eval-size 32), in the
    # chat format users get by default (data.format auto on the instruct model), each against chat-lora-5e-4 below
    # on the same budget.
    ("IA3 learning rate", "ia3-3e-3", "ia3", {"ia3.lr": 3e-3, **CHAT}),
    ("IA3 learning rate", "ia3-1e-2", "ia3", {"ia3.lr": 1e-2, **CHAT}),
    ("IA3 learning rate", "ia3-3e-2", "ia3", {"ia3.lr": 3e-2, **CHAT}),
    ("IA3 learning rate", "ia3-1e-1", "ia3", {"ia3.lr": 1e-1, **CHAT}),
    ("DoRA learning rate and LoRA+ ratio", "dora-5e-4", "lora", {"lora.lr": 5e-4, "lora.variant": "dora", **CHAT}),
    ("DoRA learning rate and LoRA+ ratio", "dora-1e-3", "lora", {"lora.lr": 1e-3, "lora.variant": "dora", **CHAT}),
    ("DoRA learning rate and LoRA+ ratio", "dora-2e-3", "lora", {"lora.lr": 2e-3, "lora.variant": "dora", **CHAT}),
    ("DoRA learning rate and LoRA+ ratio", "loraplus-5e-4-x4", "lora", {"lora.lr": 5e-4, "lora.lr_ratio": 4, **CHAT}),
    ("DoRA learning rate and LoRA+ ratio", "loraplus-5e-4-x16", "lora", {"lora.lr": 5e-4, "lora.lr_ratio": 16, **CHAT}),
    ("Prefix tuning: learning rate and initialisation", "prefix-text-3e-3", "prefix", {"prefix.lr": 3e-3, **CHAT}),
    ("Prefix tuning: learning rate and initialisation", "prefix-text-1e-2", "prefix", {"prefix.lr": 1e-2, **CHAT}),
    ("Prefix tuning: learning rate and initialisation", "prefix-text-3e-2", "prefix", {"prefix.lr": 3e-2, **CHAT}),
    ("Prefix tuning: learning rate and initialisation", "prefix-text-1e-1", "prefix", {"prefix.lr": 1e-1, **CHAT}),
    ("Prefix tuning: learning rate and initialisation", "prefix-random-3e-2", "prefix",
     {"prefix.lr": 3e-2, "prefix.init": "random", **CHAT}),
    ("Prefix tuning: learning rate and initialisation", "prefix-projection-3e-3", "prefix",
     {"prefix.lr": 3e-3, "prefix.projection": True, **CHAT}),
    ("P-tuning: learning rate and encoder", "ptuning-mlp-3e-3", "ptuning", {"ptuning.lr": 3e-3, **CHAT}),
    ("P-tuning: learning rate and encoder", "ptuning-mlp-1e-2", "ptuning", {"ptuning.lr": 1e-2, **CHAT}),
    ("P-tuning: learning rate and encoder", "ptuning-mlp-3e-2", "ptuning", {"ptuning.lr": 3e-2, **CHAT}),
    ("P-tuning: learning rate and encoder", "ptuning-mlp-1e-1", "ptuning", {"ptuning.lr": 1e-1, **CHAT}),
    ("P-tuning: learning rate and encoder", "ptuning-lstm-1e-2", "ptuning",
     {"ptuning.lr": 1e-2, "ptuning.encoder_reparameterization_type": "lstm", **CHAT}),
    ("Template and context", "lora-all-5e-4-instruction", "lora",
     {"lora.lr": 5e-4, "lora.targets": ALL_LINEAR, "data.template": INSTRUCTION, "eval.before": True}),
    ("Template and context", "lora-all-5e-4-len512", "lora",
     {"lora.lr": 5e-4, "lora.targets": ALL_LINEAR, "data.max_length": 512}),
    # The chat format (data.format chat, the xsum instruction): does each method's learning rate still fit? Compare
    # with lora-attn-5e-4 and prompt-text-1e-1 (plain) at the same --budget-tokens.
    ("Learning rates in the chat format", "chat-lora-5e-4", "lora",
     {"lora.lr": 5e-4, "data.format": "chat", "eval.before": True}),
    ("Learning rates in the chat format", "chat-lora-1e-3", "lora", {"lora.lr": 1e-3, "data.format": "chat"}),
    ("Learning rates in the chat format", "chat-prompt-1e-1", "prompt", {"prompt.lr": 1e-1, "data.format": "chat"}),
    ("Learning rates in the chat format", "chat-prompt-3e-1", "prompt", {"prompt.lr": 3e-1, "data.format": "chat"}),
]
# (trial name, trained trial it re-scores, eval overrides)
DECODING = [
    ("decode-beam4", "lora-all-5e-4", {"eval.num_beams": 4}),
    ("decode-no-ngram-block", "lora-all-5e-4", {"eval.no_repeat_ngram_size": 0}),
    ("decode-repetition-1.3", "lora-all-5e-4", {"eval.no_repeat_ngram_size": 0, "eval.repetition_penalty": 1.3}),
    ("decode-beam4-prompt", "prompt-text-3e-1", {"eval.num_beams": 4}),
    ("decode-beam4-untouched", None, {"eval.num_beams": 4}),
]


def base_overrides(args) -> dict:
    return {"data.source": args.data, "data.train_size": args.train_size, "data.eval_size": args.eval_size,
            "data.train_eval_size": 0, "train.budget_tokens": args.budget_tokens, "train.checkpoint_every": 0,
            "eval.batch_size": args.eval_batch_size, "eval.before": False, "model.device": args.device,
            # The trials before the chat format were measured in the plain format, against the untouched model alone.
            "data.format": "plain", "eval.baselines": ["zero-shot"],
            **({"model.name": args.model, "model.random_init": args.random_init} if args.model else {})}


def row(question: str, name: str, result: dict, seconds: float, training: dict | None = None) -> dict:
    rouge = result["rouge"]
    out = {"question": question, "trial": name, "loss": result["loss"], "n": result["n"],
           **{k: rouge[k]["mean"] for k in ("rouge1", "rouge2", "rougeL")},
           "rouge1_half_ci": (rouge["rouge1"]["high"] - rouge["rouge1"]["low"]) / 2, "seconds": seconds}
    if training:
        out.update(steps=training["steps"], epochs=training.get("epochs_completed"), tokens=training["tokens"],
                   tokens_per_s=training["tokens_per_s"])
    return out


def run_trial(args, question: str, name: str, method: str, overrides: dict, first: bool) -> list[dict]:
    started = time.perf_counter()
    settings = {**base_overrides(args), "eval.before": first, **overrides, "methods": [method],
                "out": str(Path(args.out) / name)}
    results = compare(load_config(None, settings), progress=False, resume=True)
    rows = []
    if results.get("baseline") and results["baseline"].get("eval"):
        template = ("chat format" if overrides.get("data.format") == "chat" else
                    "instruction template" if "data.template" in overrides else "TL;DR template")
        rows.append(row(question, f"untouched ({template})", results["baseline"]["eval"], 0.0))
    m = results["methods"][method]
    rows.append(row(question, name, m["after"]["eval"], time.perf_counter() - started, m["training"]))
    return rows


def run_decoding(args, name: str, trained: str | None, overrides: dict) -> dict:
    started = time.perf_counter()
    run = Path(args.out) / trained / trained.split("-")[0] if trained else None  # <trial>/<method>, as compare wrote it
    if run is None:
        cfg = load_config(None, {**base_overrides(args), "methods": ["lora"], **overrides})
    else:
        cfg = load_config(run / RUN_CONFIG,
                          {"eval.batch_size": args.eval_batch_size, "model.device": args.device, **overrides},
                          saved=True)
    session = open_session(cfg, progress=False)
    if run is None:
        adapted = untouched(session.loaded.model, session.dtype)
    else:
        method = method_named(cfg.methods[0])  # a PiSSA/OLoRA trial is saved as a plain LoRA: load it as such
        adapted = adapt(session.loaded.model, session.loaded.tokenizer, method.name, method.saved_as(cfg))
        adapters.load_into(adapted, run)
    splits = load_data(cfg.data, seed=cfg.train.seed)
    result = evaluate(adapted, session.loaded.tokenizer, splits.eval, cfg.data, cfg.eval, session.device,
                      session.dtype)
    return row("Decoding", f"{name} ({trained or 'untouched'})", result, time.perf_counter() - started)


def markdown(rows: list[dict]) -> str:
    lines = []
    for question in dict.fromkeys(r["question"] for r in rows):
        lines += [f"### {question}", "", "| trial | eval loss | ROUGE-1 | ROUGE-2 | ROUGE-L | steps | epochs |",
                  "|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["question"] == question):
            epochs = f"{r['epochs']:.2f}" if r.get("epochs") is not None else "–"
            lines.append(f"| {r['trial']} | {r['loss']:.3f} | {r['rouge1']:.1f} ± {r['rouge1_half_ci']:.1f} | "
                         f"{r['rouge2']:.1f} | {r['rougeL']:.1f} | {r.get('steps', '–')} | {epochs} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/xsum")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    parser.add_argument("--random-init", action="store_true", help="with --model: random weights (smoke tests)")
    parser.add_argument("--out", default="runs/tune")
    parser.add_argument("--budget-tokens", type=int, default=650_000, help="about 800 s of training on a 2-core CPU")
    parser.add_argument("--train-size", type=int, default=0, help="0 = the whole train split")
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--only", default="", help="comma-separated trial names (default: all)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    rows: list[dict] = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (question, name, method, overrides) in enumerate(TRIALS):
        if not only or name in only:
            rows += run_trial(args, question, name, method, overrides, first=(i == 0))
            (out / "tune.json").write_text(json.dumps(rows, indent=1))
            print(f"{name}: ROUGE-1 {rows[-1]['rouge1']:.1f}, loss {rows[-1]['loss']:.3f}", flush=True)
    for name, trained, overrides in DECODING:
        if (not only or name in only) and (trained is None or (out / trained).is_dir()):
            rows.append(run_decoding(args, name, trained, overrides))
            (out / "tune.json").write_text(json.dumps(rows, indent=1))
            print(f"{name}: ROUGE-1 {rows[-1]['rouge1']:.1f}", flush=True)
    text = markdown(rows)
    (out / "tune.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Measure the prompt-format defaults: the untouched model's zero-shot ROUGE in the plain format and in the chat
format with a few instruction wordings, and lead-k for a few k, on validation documents of each data set.

    python benchmarks/formats.py --out runs/formats                      # every data set of ../shared/data
    python benchmarks/formats.py --only xsum,samsum --eval-size 60       # a few

Every trial is peftsum's own `evaluate` (loss + greedy generation with the run's eval settings + ROUGE with 95%
intervals) on the same seeded validation subset; finished trials are read back from OUT/<set>/<trial>.json, so the
script resumes. Only validation splits are scored (docs/defaults.md says why that is the honest caveat).
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
from peftsum.evaluation.evaluate import evaluate, score_predictions  # noqa: E402
from peftsum.methods.base import untouched  # noqa: E402
from peftsum.study.baselines import lead  # noqa: E402

# data set -> (settings of its shipped config or the demo, instruction wordings, lead settings to try)
SETS = {
    "cnn_dailymail": ({"data.max_length": 384, "data.max_summary_tokens": 80, "eval.max_new_tokens": 80},
                      ["Summarize this article in three short sentences.",
                       "Summarize the following news article in a few sentences.",
                       "Write the highlights of this article as three short sentences."],
                      [(3, "sentence"), (2, "sentence"), (4, "sentence")]),
    "xsum": ({"data.max_length": 256, "data.max_summary_tokens": 64, "eval.max_new_tokens": 64},
             ["Summarize this article in one sentence.",
              "Write a one-sentence summary of this article.",
              "What is this article about? Answer in one sentence."],
             [(1, "sentence"), (2, "sentence")]),
    "samsum": ({"data.max_length": 384, "data.max_summary_tokens": 64, "eval.max_new_tokens": 64},
               ["Summarize this dialogue in one or two sentences.",
                "Summarize this conversation in one sentence.",
                "Write a short summary of this chat: who did what, in one or two sentences."],
               [(1, "line"), (2, "line"), (3, "line"), (2, "sentence")]),
    "dialogsum": ({"data.max_length": 384, "data.max_summary_tokens": 64, "eval.max_new_tokens": 64},
                  ["Summarize this dialogue in one or two sentences.",
                   "Summarize this conversation in one sentence.",
                   "Write a short summary of this chat: who did what, in one or two sentences."],
                  [(1, "line"), (2, "line"), (3, "line"), (2, "sentence")]),
    "scitldr": ({"data.max_length": 384, "data.max_summary_tokens": 64, "eval.max_new_tokens": 64},
                ["Write a one-sentence TL;DR of this paper.",
                 "Summarize this abstract in one sentence.",
                 "What is the main contribution of this paper? Answer in one sentence."],
                [(1, "sentence"), (2, "sentence")]),
}


def trial(path: Path, run) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    started = time.perf_counter()
    result = run()
    result = {"loss": result["loss"], "n": result["n"], "rouge": result["rouge"],
              "seconds": time.perf_counter() - started}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def cells(result: dict) -> str:
    r = result["rouge"]
    loss = "–" if result["loss"] is None else f"{result['loss']:.3f}"
    return (f"{loss} | {r['rouge1']['mean']:.1f} ± {(r['rouge1']['high'] - r['rouge1']['low']) / 2:.1f} | "
            f"{r['rouge2']['mean']:.1f} | {r['rougeLsum']['mean']:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--out", default="runs/formats")
    parser.add_argument("--eval-size", type=int, default=60, help="validation documents per set (at most all)")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated data sets (default: all)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    lines = []
    session = None
    for name, (settings, instructions, leads) in SETS.items():
        if only and name not in only:
            continue
        folder = Path(args.data) / name
        available = sum(1 for _ in (folder / "validation.jsonl").open())
        base = {"data.source": str(folder), "data.train_eval_size": 0, "data.train_size": 0,
                "data.eval_size": min(args.eval_size, available), "eval.batch_size": args.eval_batch_size,
                **settings}
        cfg = load_config(None, base)
        if session is None:
            session = open_session(cfg, progress=False)
            model = untouched(session.loaded.model, session.dtype)
        examples = load_data(cfg.data, seed=0).eval
        out = Path(args.out) / name
        rows = []

        def zero_shot(overrides: dict):
            trial_cfg = load_config(None, {**base, **overrides})
            return lambda: evaluate(model, session.tokenizer, examples, trial_cfg.data, trial_cfg.eval,
                                    session.device, session.dtype)

        rows.append(("plain, `{document}\\nTL;DR:`", trial(out / "plain.json", zero_shot({"data.format": "plain"}))))
        for i, text in enumerate(instructions):
            result = trial(out / f"chat-{i}.json", zero_shot({"data.format": "chat", "data.instruction": text}))
            rows.append((f"chat, \"{text}\"", result))
        for k, unit in leads:
            predictions = [lead(e.document, k, unit, max_words=cfg.eval.max_new_tokens) for e in examples]
            result = trial(out / f"lead-{k}-{unit}.json", lambda: score_predictions(examples, predictions, 1000, 0))
            rows.append((f"lead-{k} ({unit}s)", result))
        for label, result in rows:
            print(f"{name}: {label}: ROUGE-1 {result['rouge']['rouge1']['mean']:.1f}", flush=True)
        lines += [f"### {name} ({len(examples)} validation documents)", "",
                  "| system | eval loss | ROUGE-1 | ROUGE-2 | ROUGE-Lsum |", "|---|---|---|---|---|",
                  *(f"| {label} | {cells(result)} |" for label, result in rows), ""]
    text = "\n".join(lines)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "formats.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

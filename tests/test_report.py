"""Tests for peftsum.report on fabricated results dicts (no model, no training: fast)."""

from __future__ import annotations

import copy
import math

import pytest

from peftsum.report import render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOTAL = 134_515_008


def _split(r1: float, half: float = 2.0, loss: float = 2.5, n: int = 32) -> dict:
    """A SPLIT whose ROUGE-1 is r1 ± half; the other scores are derived so every key is present."""
    def score(mean):
        return {"mean": mean, "low": mean - half, "high": mean + half}
    return {"loss": loss, "n": n, "tokens": n * 40,
            "rouge": {"rouge1": score(r1), "rouge2": score(r1 / 3), "rougeL": score(r1 * 0.7), "rougeLsum": score(r1 * 0.8)}}


def _method(trainable: int, description: str, after_eval: dict | None, tokens_per_s: float, floor: float) -> dict:
    steps = 120
    curve = [[s, 3.0 * math.exp(-s / (30 * floor)) + floor + 0.3 * math.sin(s * 1.7)] for s in range(1, steps + 1)]
    return {
        "params": {"total": TOTAL + (trainable if "LoRA" in description or "virtual" in description else 0),
                   "trainable": trainable, "trainable_percent": 100 * trainable / TOTAL, "description": description},
        "training": {"epochs": [{"epoch": e, "seconds": 30.0 + e, "tokens": 50_000, "tokens_per_s": tokens_per_s,
                                 "mean_loss": 2.0} for e in (1, 2)],
                     "steps": steps, "seconds": 62.0, "tokens_per_s": tokens_per_s, "peak_memory_mb": None,
                     "loss_curve": curve},
        "after": {"train": _split(after_eval["rouge"]["rouge1"]["mean"] + 1 if after_eval else 25.0), "eval": after_eval},
        "dir": "x",
    }


def make_results(n_methods: int = 3) -> dict:
    """Three methods: lora clearly best on ROUGE-1; lora and prompt overlap on ROUGE-2/L; finetune worst."""
    methods = {
        "lora": _method(460_800, "LoRA r=8 alpha=16 on q_proj, v_proj", _split(31.2, 2.0, loss=2.10), 4_100.0, 1.5),
        "prompt": _method(5_760, "10 virtual tokens initialised from text", _split(24.0, 2.0, loss=2.30), 5_300.0, 2.2),
        "finetune": _method(28_311_552, "LM head (tied to the input embeddings)", _split(22.0, 1.5, loss=2.20), 3_900.0, 1.9),
    }
    methods["prompt"]["after"]["eval"]["rouge"]["rouge2"] = {"mean": 10.0, "low": 8.5, "high": 11.5}
    names = list(methods)[:n_methods]
    return {
        "peftsum_version": "0.1.0", "created": "2024-01-01T00:00:00+00:00", "wall_seconds": 754.2,
        "config": {"model": {"name": "smollm2-135m"}, "data": {"source": "cnn_dailymail"}, "methods": names,
                   "train": {"epochs": 2, "seed": 7}, "out": "runs/x"},
        "environment": {"python": "3.12.1", "torch": "2.4.0", "transformers": "4.44.0", "platform": "Linux",
                        "cpu": "Test CPU", "device": "cpu", "precision": "fp32", "threads": 8, "gpu": None},
        "model": {"name": "smollm2-135m", "architecture": "LlamaForCausalLM", "total_params": TOTAL,
                  "tied_embeddings": True},
        "data": {"source": "cnn_dailymail", "document_column": "article", "summary_column": "highlights",
                 "train_examples": 1000, "train_eval_examples": 32, "eval_examples": 32, "skipped": 3},
        "baseline": {"train": _split(15.0), "eval": _split(14.0, loss=3.1)},
        "methods": {n: methods[n] for n in names},
    }


def test_write_report_files(tmp_path):
    path = write_report(make_results(), tmp_path / "out")
    assert path == tmp_path / "out" / "report.md" and path.read_text().startswith("# peftsum comparison")
    for name in ("loss_curves.png", "rouge.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert sorted(p.name for p in path.parent.iterdir()) == ["loss_curves.png", "report.md", "rouge.png"]  # no temp left


def test_sections_in_order_and_tables():
    md = render_markdown(make_results())
    heads = ["## Verdict", "## Results", "## Resources", "## Plots", "## Configuration"]
    assert [md.index(h) for h in heads] == sorted(md.index(h) for h in heads)
    for name in ("lora", "prompt", "finetune"):
        assert f"### {name}" in md
    for row in ("| before / train |", "| before / eval |", "| after / train |", "| after / eval |"):
        assert md.count(row) == 3
    assert "| after / eval | 2.100 | 31.2 ± 2.0 |" in md
    assert "| untouched model | 3.100 | 14.0 ± 2.0 |" in md
    assert "![training loss](loss_curves.png)" in md and "![ROUGE before and after](rouge.png)" in md
    assert "seed 7" in md and "12 min 34 s" in md


def test_resources_format():
    md = render_markdown(make_results())
    assert "| lora | 134,975,808 | 460,800 | 0.3426 |" in md
    assert "| finetune | 134,515,008 | 28,311,552 | 21.05 | 31.5 | 3,900 | – |" in md
    assert "| prompt | 134,520,768 | 5,760 | 0.004282 |" in md  # tiny share: no scientific notation
    assert "LM head (tied to the input embeddings)" in md


def test_verdict_winners_and_noise():
    verdict = render_markdown(make_results()).split("## Verdict")[1].split("## Results")[0]
    assert "**lora** has the lowest eval loss" in verdict
    assert "**lora** wins on ROUGE-1 (31.2 [29.2, 33.2]), clear of prompt (24.0 [22.0, 26.0])" in verdict
    assert "lora leads on ROUGE-2 (10.4 [8.4, 12.4]) but its interval overlaps prompt's (10.0 [8.5, 11.5]): " \
           "no clear winner" in verdict
    assert "lora improved eval ROUGE-1 over the untouched model" in verdict
    assert "the intervals do not overlap" in verdict
    assert "Fastest training: **prompt** (5,300 tokens/s)" in verdict
    assert "Fewest trainable parameters: **prompt** (5,760, 0.004282 % of the model)" in verdict


def test_verdict_no_improvement_within_noise():
    results = make_results()
    results["baseline"]["eval"] = _split(23.0)
    verdict = render_markdown(results).split("## Results")[0]
    assert "finetune did not improve eval ROUGE-1" in verdict and "within noise" in verdict


def test_single_method():
    md = render_markdown(make_results(1))
    assert "Only one method was run (lora)" in md and "Fastest training" not in md
    assert "lora improved eval ROUGE-1" in md


def test_null_eval_split_and_null_baseline(tmp_path):
    results = make_results()
    results["baseline"] = None
    results["methods"]["prompt"]["after"]["eval"] = None
    md = render_markdown(results)
    assert "| before / eval | – | – | – | – |" in md
    assert "| prompt | – | – | – | – | – |" in md
    assert "no before/after comparison" in md
    write_report(results, tmp_path)  # charts must cope with the gaps too


def test_all_eval_missing(tmp_path):
    results = make_results()
    results["baseline"]["eval"] = None
    for m in results["methods"].values():
        m["after"]["eval"] = None
        m["training"]["loss_curve"] = []
    assert "Fewer than two methods have eval scores" in render_markdown(results)
    assert (tmp_path / "rouge.png").exists() is False
    write_report(results, tmp_path)
    assert (tmp_path / "rouge.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("n", [1, 3])
def test_deterministic_and_pure(n):
    results = make_results(n)
    before = copy.deepcopy(results)
    assert render_markdown(results) == render_markdown(copy.deepcopy(results))
    assert results == before  # rendering must not mutate its input


def test_config_yaml_block():
    md = render_markdown(make_results())
    config = md.split("```yaml\n")[1].split("```")[0]
    assert config.startswith("model:\n  name: smollm2-135m\n")
    assert "Runs are deterministic for a given seed, configuration and machine." in md
    assert "article` → `highlights`" in md and "3 rows skipped" in md

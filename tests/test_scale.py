"""`peftsum scale`: --models parsing, one model's record (intervals, the paired gap over seed means), the tables, and
two tiny random-init models end to end, then resumed."""

import json
import subprocess
import sys

import numpy as np
import pytest

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.errors import UserError
from peftsum.evaluation.metrics import bootstrap_interval, paired_bootstrap
from peftsum.infra.runs import model_folder
from peftsum.study.scale import model_record, parse_models, plan_models, render_scale_markdown, scale_table

FAST = ["--budget-tokens", "300", "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "6",
        "--eval.max_new_tokens", "4", "--eval.bootstrap_samples", "50", "--data.max_length", "64",
        "--data.max_summary_tokens", "12", "--prompt.num_virtual_tokens", "4", "--precision", "fp32"]


def test_models_are_a_list_of_at_least_two_distinct_names():
    assert parse_models("smollm2-135m, gemma3-270m,") == ["smollm2-135m", "gemma3-270m"]
    with pytest.raises(UserError, match="at least two models"):
        parse_models("gpt2")
    with pytest.raises(UserError, match="gpt2 given more than once"):
        parse_models("gpt2,smollm2-135m,gpt2")


def test_each_model_gets_its_folder_and_nothing_else_changes(tmp_path):
    (tmp_path / "a" / "tiny").mkdir(parents=True)
    (tmp_path / "b" / "tiny").mkdir(parents=True)
    assert model_folder("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB_SmolLM2-360M"
    assert model_folder(str(tmp_path / "a" / "tiny")) == "tiny"
    cfg = load_config(overrides={"out": "runs/s", "seeds": 2, "train.budget_tokens": 1000})
    plans = plan_models(cfg, ["gpt2", "gemma3-270m"])
    assert [(m, f, c.out) for m, f, c in plans] == [("gpt2", "gpt2", "runs/s/gpt2"),
                                                   ("gemma3-270m", "gemma3-270m", "runs/s/gemma3-270m")]
    assert all(c.seeds == 2 and c.train.budget_tokens == 1000 and c.model.name == m for m, _, c in plans)
    assert cfg.model.name == "smollm2-135m"  # the scale's own config is untouched
    with pytest.raises(UserError, match="share the folder name 'tiny'"):
        plan_models(cfg, [str(tmp_path / "a" / "tiny"), str(tmp_path / "b" / "tiny")])


def _run(scores: list[float], loss: float, seconds: float = 10.0) -> dict:
    return {"after": {"eval": {"loss": loss, "per_document": {"rouge1": scores}}},
            "training": {"seconds": seconds, "tokens": 1000, "tokens_per_s": 1000 / seconds, "steps": 5}}


def test_record_uses_each_documents_mean_over_seeds():
    lora = [[30.0, 10.0, 20.0, 40.0], [34.0, 12.0, 18.0, 44.0]]
    prompt = [[20.0, 12.0, 10.0, 30.0], [22.0, 8.0, 14.0, 28.0]]
    results = {"model": {"architecture": "LlamaForCausalLM", "total_params": 1234},
               "baseline": {"eval": {"loss": 3.0, "rouge": {"rouge1": {"mean": 15.0, "low": 12.5, "high": 17.5}}}},
               "environment": {"cpu": "AMD EPYC", "precision": "bfloat16"},
               "methods": {name: {"params": {"trainable": n},
                                  "seed_runs": [_run(s, loss) for s, loss in zip(runs, losses)]}
                           for name, n, runs, losses in (("lora", 100, lora, (2.5, 2.7)),
                                                         ("prompt", 10, prompt, (2.9, 2.8)))}}
    record = model_record("m", "m", results, samples=200)
    lora_mean, prompt_mean = np.mean(lora, axis=0), np.mean(prompt, axis=0)
    assert record["methods"]["lora"]["rouge1"] == bootstrap_interval(lora_mean, samples=200, seed=0)
    assert record["methods"]["lora"]["eval_loss"] == pytest.approx({"mean": 2.6, "low": 2.5, "high": 2.7})
    assert record["methods"]["prompt"]["seeds"] == 2 and record["eval_documents"] == 4
    assert record["gap"] == paired_bootstrap(prompt_mean, lora_mean, samples=200, seed=0)
    assert record["gap"]["diff"] == pytest.approx(-8.0)
    assert record["baseline"] == {"eval_loss": 3.0, "rouge1": 15.0,
                                  "rouge1_interval": {"mean": 15.0, "low": 12.5, "high": 17.5}}
    untouched_row = next(line for line in scale_table([record]) if "| untouched |" in line)
    assert "| 15.0 [12.5, 17.5] |" in untouched_row  # the baseline's interval, as the methods'
    del results["methods"]["prompt"]
    assert model_record("m", "m", results, samples=200)["gap"] is None


def test_a_run_without_per_document_scores_is_refused():
    results = {"model": {"architecture": "X", "total_params": 1},
               "methods": {"lora": {"params": {"trainable": 1}, **_run([1.0], 2.0)}}}
    del results["methods"]["lora"]["after"]["eval"]["per_document"]
    with pytest.raises(UserError, match="no per-document eval scores"):
        model_record("m", "m", results, samples=10)


def test_cli_refuses_model_with_models_in_one_line():
    result = subprocess.run([sys.executable, "-m", "peftsum", "scale", "--models", "a,b", "--model", "c"],
                            capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "leave out --model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_scale_folder_in_use_is_refused_before_any_model_loads(tmp_path, capsys):
    from peftsum.infra import lock

    out = tmp_path / "scale"
    held = lock.acquire(out)  # another process's lock, as far as the command can tell (its own file description)
    try:
        assert main(["scale", "--models", "nowhere-a,nowhere-b", "--out", str(out), "--eval-size", "4"]) == 2
    finally:
        held.release()
    error = capsys.readouterr().err
    assert f"{out} is in use by process" in error and len(error.strip().splitlines()) == 1


def test_scale_end_to_end_then_resume_reads_back(tiny_model_dirs, tiny_data, tmp_path, capsys):
    out = tmp_path / "scale"
    models = f"{tiny_model_dirs['gpt2']},{tiny_model_dirs['llama']}"
    args = ["scale", "--models", models, "--random-init", "--data", str(tiny_data), "--out", str(out),
            "--methods", "lora,prompt", "--seeds", "2", *FAST]
    assert main(args) == 0
    printed = capsys.readouterr().out
    scale = json.loads((out / "scale.json").read_text())
    records = {r["model"]: r for r in scale["models"]}
    assert set(records) == {str(tiny_model_dirs["gpt2"]), str(tiny_model_dirs["llama"])}
    for kind in ("gpt2", "llama"):
        record = records[str(tiny_model_dirs[kind])]
        results = json.loads((out / kind / "results.json").read_text())  # each model is a normal comparison
        assert results["config"]["model"]["name"] == str(tiny_model_dirs[kind]) and results["config"]["seeds"] == 2
        assert record["total_params"] == results["model"]["total_params"]
        assert set(record["methods"]) == {"lora", "prompt"} and record["eval_documents"] == 6
        for method in record["methods"].values():
            assert method["seeds"] == 2 and method["tokens"] >= 300  # the token budget, for every seed
            r1 = method["rouge1"]
            assert 0 <= r1["low"] <= r1["mean"] <= r1["high"] <= 100
        assert record["gap"]["low"] <= record["gap"]["diff"] <= record["gap"]["high"]
        assert (out / kind / "prompt" / "seed-1" / "adapter_model.safetensors").is_file()
    sizes = {record["total_params"] for record in records.values()}
    assert len(sizes) == 2
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "scale.md").read_text()
    assert text == render_scale_markdown(scale["models"], scale["config"])
    assert "prompt − lora ROUGE-1" in text and "300 training tokens per method" in text
    assert f"| {tiny_model_dirs['llama']} |" in printed

    weights = out / "llama" / "lora" / "seed-0" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main(args) == 2  # a finished model is not overwritten by accident
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out.count("finished earlier; results read back") == 2
    assert weights.stat().st_mtime_ns == stamp
    assert json.loads((out / "scale.json").read_text()) == scale

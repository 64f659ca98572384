"""The command line end to end on tiny random-init models and tiny data."""

import json
import subprocess
import sys

import pytest
from conftest import KINDS

from peftsum.cli import main

FAST = ["--train.epochs", "2", "--train.batch_size", "4", "--data.train_eval_size", "4", "--eval-size", "4",
        "--eval.max_new_tokens", "8", "--eval.bootstrap_samples", "50", "--data.max_length", "64",
        "--data.max_summary_tokens", "12", "--prompt.num_virtual_tokens", "4", "--precision", "fp32"]


@pytest.mark.parametrize("kind", KINDS)
def test_compare_writes_a_complete_report(kind, tiny_model_dirs, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["compare", "--model", str(tiny_model_dirs[kind]), "--random-init", "--data", str(tiny_data),
                 "--out", str(out), "--finetune.last_blocks", "1", *FAST])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"lora", "prompt", "finetune"}
    for method, entry in results["methods"].items():
        assert entry["training"]["steps"] == 2 * 6  # 24 examples / batch 4, 2 epochs
        assert len(entry["training"]["epochs"]) == 2
        assert entry["after"]["eval"]["n"] == 4 and 0 <= entry["after"]["eval"]["rouge"]["rouge1"]["mean"] <= 100
        assert (out / method / "predictions_eval.jsonl").read_text().count("\n") == 4
        assert (out / method / "train_log.jsonl").read_text().count("\n") == 12
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert (out / "prompt" / "adapter_config.json").is_file()
    assert (out / "finetune" / "finetuned.safetensors").is_file()
    # The statistics the report shows are in results.json too: every paired test of the Significance section.
    assert results["schema_version"] == 3
    analysis = results["analysis"]
    assert sorted(analysis["ranking"]["rouge1"]) == ["finetune", "lora", "prompt"]
    tested = {(t["a"], t["b"], t["metric"]) for t in analysis["tests"]}
    # The tiny tokenizer has no chat template: the plain format, so the baselines are zero-shot and lead.
    assert list(results["baselines"]) == ["zero-shot", "lead"] and results["prompt"]["format"] == "plain"
    assert {(m, b, "rouge1") for m in results["methods"] for b in ("untouched model", "lead")} <= tested
    assert len(tested) == 15 + 3 * 3  # leader, untouched model; each method against lead on three keys
    report = (out / "report.md").read_text()
    labels = analysis["baselines"]["labels"]
    for t in analysis["tests"]:
        assert f"| {labels.get(t['a'], t['a'])} − {labels.get(t['b'], t['b'])} |" in report
    for heading in ("## Verdict", "## Results", "## Resources", "## Configuration", "before / eval", "after / train"):
        assert heading in report
    for png in ("loss_curves.png", "rouge.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_lowers_the_loss_on_learnable_data(tiny_model_dirs, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["compare", "--model", str(tiny_model_dirs["llama"]), "--random-init", "--data", str(tiny_data),
            "--out", str(out), "--methods", "finetune", "--finetune.all", "true", "--finetune.lr", "3e-3", *FAST,
            "--train.epochs", "4"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["finetune"]["after"]["train"]["loss"] < results["baseline"]["train"]["loss"] - 0.5


def test_dry_run_json_plan(tiny_model_dirs, capsys):
    assert main(["compare", "--model", str(tiny_model_dirs["gpt2"]), "--random-init", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["methods"]) == {"lora", "prompt", "finetune"}
    for counts in plan["methods"].values():
        assert 0 < counts["trainable"] < counts["total"]


def test_train_then_evaluate_the_saved_run(tiny_model_dirs, tiny_data, tmp_path, capsys):
    folder = tmp_path / "lora"
    base = ["--model", str(tiny_model_dirs["gpt2"]), "--random-init", "--data", str(tiny_data), *FAST]
    assert main(["train", "--method", "lora", "--out", str(folder), *base]) == 0
    assert (folder / "adapter_model.safetensors").is_file() and (folder / "config.yaml").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(folder), "--json", "--out", str(tmp_path / "ev")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 4 and set(result["rouge"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert (tmp_path / "ev" / "predictions_eval.jsonl").is_file()


def test_evaluate_run_scores_a_dropout_lora_as_compare_did(tiny_model_dirs, tiny_data, tmp_path, capsys):
    # With dropout left on (the model in training mode), each evaluation would draw new masks: another loss.
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_model_dirs["llama"]), "--random-init", "--data", str(tiny_data),
                 "--methods", "lora", "--lora.dropout", "0.5", "--eval.before", "false", "--out", str(out),
                 *FAST]) == 0
    scored = json.loads((out / "lora" / "metrics.json").read_text())["after"]["eval"]
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out / "lora"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(scored["loss"], rel=1e-6)
    assert result["per_document"] == scored["per_document"]


def test_score_text_and_jsonl(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("the cat sat on the mat\npolice arrest man\n")
    (tmp_path / "r.jsonl").write_text('{"summary": "the cat sat on the mat"}\n{"summary": "man arrested by police"}\n')
    assert main(["score", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.jsonl"),
                 "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 2 and 60 < scores["rouge"]["rouge1"]["mean"] < 100
    assert main(["score", "--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.jsonl")]) == 0
    assert "rouge1" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["compare", "--data", "{data}", "--document-column", "body", "--dry-run"], "no column 'body'"),
    (["compare", "--lora.rank", "0"], "lora.rank must be >= 1"),
    (["compare", "--model", "/nonexistent/model/dir", "--dry-run"], "cannot load model"),
    (["score", "--predictions", "/nonexistent.txt", "--references", "/nonexistent.txt"], "not found"),
    (["evaluate", "--run", "/tmp"], "not a trained run folder"),
])
def test_user_errors_are_one_line_with_exit_code_2(args, message, tiny_data, tiny_model_dirs, tmp_path):
    args = [a.replace("{data}", str(tiny_data)) for a in args]
    if "--document-column" in args:  # needs data loading, which a dry run skips: train instead
        args = ["train", "--method", "lora", "--model", str(tiny_model_dirs["gpt2"]), "--random-init",
                "--data", str(tiny_data), "--document-column", "body", "--out", str(tmp_path / "x")]
    result = subprocess.run([sys.executable, "-m", "peftsum", *args], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["compare"], ["train", "--method", "lora"], ["sweep", "--vary", "lora.rank=1,2"],
                                     ["scale", "--models", "a,b"]])
def test_an_unusable_out_folder_is_refused_before_torch_is_imported(command, tiny_data, tmp_path):
    """Importing torch and transformers takes seconds: a refusal a user can cause comes before them."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = ("import sys; from peftsum.cli import main; code = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *command, "--data", str(tiny_data),
                             "--out", str(blocker / "run")], capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"peftsum: error: --out {blocker / 'run'}: {blocker} is a file, not a folder"
    assert result.stdout.strip() == "no torch"


def test_bad_flag_exits_2():
    result = subprocess.run([sys.executable, "-m", "peftsum", "compare", "--no-such-flag"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr

"""Equal budgets: training runs until its share of wall-clock or tokens is spent, over as many epochs as that takes,
with warmup and decay following the share of the budget spent. Tiny random-init models."""

import json

import pytest

from peftsum import train as train_module
from peftsum.cli import main

from conftest import max_diff, step_losses, trained_weights

# 24 training examples in batches of 4: 6 steps per epoch.
TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "0", "--train.checkpoint_every", "0"]


MAX_STEP_TOKENS = 4 * 64  # an upper bound of one step's real tokens: 4 examples of at most 64 tokens


def log_rows(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def train_args(model_dir, data, out, *extra):
    return [str(a) for a in ["train", "--method", "lora", "--model", model_dir, "--data", data, "--out", out,
                             *TINY, *extra]]


def test_budget_factor_warms_up_then_decays_over_the_budget():
    f = train_module.budget_factor
    assert f("linear", 0.1, 0.0, 0.0) == 0.0
    assert f("linear", 0.1, 0.05, 0.05) == pytest.approx(2 / 3)  # the next step would pass the warmup's end
    assert f("linear", 0.1, 0.1, 0.05) == 1.0
    assert f("linear", 0.1, 0.55, 0.05) == pytest.approx(0.5)
    assert f("linear", 0.1, 1.2, 0.05) == 0.0  # past the budget: never negative
    assert f("cosine", 0.0, 0.5, 0.1) == pytest.approx(0.5)
    assert f("constant", 0.1, 0.9, 0.1) == 1.0


def test_a_token_budget_spans_epochs_and_stops_once_spent(tiny_model_dirs, tiny_data, tmp_path):
    out = tmp_path / "tokens"
    # One epoch of the tiny set is ~1,500 real tokens: 4,000 tokens need about two and a half epochs.
    assert main(train_args(tiny_model_dirs["gpt2"], tiny_data, out, "--budget-tokens", "4000",
                           "--train.epochs", "1")) == 0  # epochs is ignored under a budget
    rows = log_rows(out)
    epochs = sorted({r["epoch"] for r in rows})
    assert epochs[-1] >= 3, epochs
    lrs = [r["lr"] for r in rows]
    assert max(lrs) == pytest.approx(5e-4, rel=0.05)  # warmed up to the full rate...
    assert lrs[-1] < 0.1 * max(lrs)  # ...and decayed to (nearly) nothing at the budget's end


def test_a_token_budget_is_deterministic_and_reported(tiny_model_dirs, tiny_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["compare", "--model", str(tiny_model_dirs["llama"]), "--data", str(tiny_data), "--out", str(out),
                     "--methods", "lora,prompt", "--eval.before", "false", *TINY[:-2],
                     "--prompt.num_virtual_tokens", "4", "--budget-tokens", "1800"]) == 0
        runs.append(json.loads((out / "results.json").read_text()))
    for method in ("lora", "prompt"):
        a, b = runs[0]["methods"][method]["training"], runs[1]["methods"][method]["training"]
        assert a["budget"] == {"kind": "tokens", "limit": 1800}
        assert a["steps"] == b["steps"] and a["loss_curve"] == b["loss_curve"]
        assert a["tokens"] >= 1800 > a["tokens"] - MAX_STEP_TOKENS
        assert 1.0 < a["epochs_completed"] < 3.0
        last = a["epochs"][-1]
        assert last["batches"] <= last["of_batches"] == 6
    assert max_diff(trained_weights(tmp_path / "a" / "lora"), trained_weights(tmp_path / "b" / "lora")) == 0


def test_a_time_budget_stops_near_its_limit(tiny_model_dirs, tiny_data, tmp_path, monkeypatch):
    # A fake clock that advances one second per call makes the time budget exact and the test fast.
    clock = iter(range(10**9))
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    out = tmp_path / "seconds"
    assert main(train_args(tiny_model_dirs["gpt2"], tiny_data, out, "--budget-seconds", "40")) == 0
    rows = log_rows(out)
    assert 5 <= len(rows) < 40  # several reads of the clock per step: far fewer steps than seconds
    assert rows[-1]["lr"] < rows[len(rows) // 2]["lr"]


def test_a_budget_run_resumes_to_the_same_weights(tiny_model_dirs, tiny_data, tmp_path, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(train_args(tiny_model_dirs["gpt2"], tiny_data, whole, "--budget-tokens", "2500")) == 0
    # Interrupt the second run after 8 steps (past the first epoch's end checkpoint), then resume it.
    real_step = train_module.torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(train_module.torch.optim.AdamW, "step", step)
    try:
        main(train_args(tiny_model_dirs["gpt2"], tiny_data, cut, "--budget-tokens", "2500"))
    except KeyboardInterrupt:
        pass
    assert not (cut / "adapter_model.safetensors").exists()
    monkeypatch.setattr(train_module.torch.optim.AdamW, "step", real_step)
    assert main(train_args(tiny_model_dirs["gpt2"], tiny_data, cut, "--budget-tokens", "2500", "--resume")) == 0
    assert step_losses(cut) == step_losses(whole)
    assert max_diff(trained_weights(cut), trained_weights(whole)) < 1e-6


@pytest.mark.parametrize("flags, message", [
    (["--budget-seconds", "10", "--budget-tokens", "100"], "give one budget"),
    (["--budget-tokens", "-1"], "train.budget_tokens must be >= 0"),
])
def test_bad_budgets_are_refused(flags, message, tiny_model_dirs, tiny_data, tmp_path, capsys):
    assert main(train_args(tiny_model_dirs["gpt2"], tiny_data, tmp_path / "x", *flags)) == 2
    assert message in capsys.readouterr().err

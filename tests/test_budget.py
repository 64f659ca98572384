"""Equal budgets: training runs until its share of wall-clock or tokens is spent, over as many epochs as that takes,
with warmup and decay following the share of the budget spent. Tiny random-init models."""

import json
import threading

import pytest
import torch
from conftest import max_diff, tiny_model, trained_weights

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.core.data import load_data
from peftsum.core.prompts import encode_example
from peftsum.methods.base import adapt
from peftsum.training import train as train_module

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


def tiny_training(tokenizer, data, **train):
    """A tiny GPT-2 with LoRA, its encoded training examples and the train settings, for calling `train` directly."""
    cfg = load_config(overrides={"model.precision": "fp32", "data.source": str(data), "data.max_length": 64,
                                 "data.max_summary_tokens": 12, "data.train_eval_size": 0,
                                 "data.eval_size": 0, "train.batch_size": 4, "train.checkpoint_every": 0,
                                 **{f"train.{k}": v for k, v in train.items()}})
    adapted = adapt(tiny_model("gpt2", tokenizer), tokenizer, "lora", cfg)
    examples = [encode_example(tokenizer, e, cfg.data) for e in load_data(cfg.data, seed=0).train]
    return adapted, examples, cfg


def run_training(tokenizer, adapted, examples, cfg, run_dir=None, **kwargs):
    env = train_module.TrainEnv(torch.device("cpu"), torch.float32, tokenizer.pad_token_id, folder=run_dir,
                                progress=False)
    return train_module.train(adapted, examples, cfg.train, cfg.lora.lr, env, **kwargs)


class StopBefore(threading.Event):
    """A stop request that arrives once `steps` optimizer steps are done (the loop asks before each step)."""

    def __init__(self, steps: int):
        super().__init__()
        self.asked, self.steps = 0, steps

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.steps


def test_a_time_budget_stops_near_its_limit(tokenizer, tiny_data):
    # A clock that advances one second per reading makes the time budget exact and the test fast.
    clock = iter(range(10**9))
    adapted, examples, cfg = tiny_training(tokenizer, tiny_data, budget_seconds=40)
    result = run_training(tokenizer, adapted, examples, cfg, clock=lambda: float(next(clock)))
    steps = result["steps"]
    assert 5 <= steps < 40  # several readings of the clock per step: far fewer steps than seconds
    assert result["budget"] == {"kind": "seconds", "limit": 40}
    assert sum(e["seconds"] for e in result["epochs"]) >= 40


def test_a_budget_run_resumes_to_the_same_weights(tokenizer, tiny_data, tmp_path):
    uninterrupted = tiny_training(tokenizer, tiny_data, budget_tokens=2500)
    whole = run_training(tokenizer, *uninterrupted, run_dir=tmp_path / "a")
    # Stop the second run after 8 steps (past the first epoch's end checkpoint), then resume it in a fresh model.
    adapted, examples, cfg = tiny_training(tokenizer, tiny_data, budget_tokens=2500)
    with pytest.raises(train_module.TrainingInterrupted) as stopped:
        run_training(tokenizer, adapted, examples, cfg, run_dir=tmp_path / "b", stop=StopBefore(8))
    assert stopped.value.step == 8 and stopped.value.saved.name == "step-00000008"
    adapted, examples, cfg = tiny_training(tokenizer, tiny_data, budget_tokens=2500)
    resumed = run_training(tokenizer, adapted, examples, cfg, run_dir=tmp_path / "b")
    assert resumed["resumed_from_step"] == 8
    assert resumed["loss_curve"] == whole["loss_curve"]
    assert resumed["steps"] == whole["steps"] > 8
    assert max_diff(adapted.named_trainable(), uninterrupted[0].named_trainable()) < 1e-6


@pytest.mark.parametrize("flags, message", [
    (["--budget-seconds", "10", "--budget-tokens", "100"], "give one budget"),
    (["--budget-tokens", "-1"], "train.budget_tokens must be >= 0"),
])
def test_bad_budgets_are_refused(flags, message, tiny_model_dirs, tiny_data, tmp_path, capsys):
    assert main(train_args(tiny_model_dirs["gpt2"], tiny_data, tmp_path / "x", *flags)) == 2
    assert message in capsys.readouterr().err

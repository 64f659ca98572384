"""Validation during training: points every N steps equal to scoring that step's weights, early stopping, keep_best,
resume with the same history, the validation subset apart from the scored one, and what the report shows. Tiny
random-init GPT-2 in fp32 on the CPU, calling `train` directly where the test needs its internals."""

import json
import threading

import pytest
import torch
from conftest import max_diff, tiny_model, write_tiny_data

from peftsum.cli import main
from peftsum.config import load_config
from peftsum.core.data import Example, load_data, validation_note, validation_subset
from peftsum.core.prompts import encode_example
from peftsum.evaluation.evaluate import evaluate, generate, mean_loss, validation
from peftsum.methods.base import adapt
from peftsum.outputs.report import loss_figure, render_markdown
from peftsum.training import train as train_module

CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 training documents whose summary is always "council council council", 12 eval documents summarised by
    their first six words: training drives the model towards "council", so the validation loss rises from the
    first steps at a learning rate a tiny head fine-tuning takes well (measured: 5.71, 5.72, 5.74, ... at 1e-2)."""
    folder = write_tiny_data(tmp_path_factory.mktemp("validation") / "data", n_train=24, n_eval=12)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    (folder / "train.jsonl").write_text("".join(json.dumps({**r, "summary": "council council council"}) + "\n"
                                                for r in rows))
    return folder


def setup(tokenizer, data, method="lora", **train):
    """(adapted, encoded training examples, cfg, splits, validate) for calling `train` directly: 6 steps per epoch,
    4 scored eval examples, 6 validation examples apart from them."""
    overrides = {"model.precision": "fp32", "data.source": str(data), "data.max_length": 64,
                 "data.max_summary_tokens": 12, "data.train_eval_size": 0, "data.eval_size": 4,
                 "train.batch_size": 4, "train.checkpoint_every": 0, "train.eval_size": 6,
                 "eval.max_new_tokens": 6, "eval.bootstrap_samples": 0, "lora.dropout": 0.1, "lora.lr": 1e-2,
                 "finetune.lr": 1e-2, **{f"train.{k}": v for k, v in train.items()}}
    cfg = load_config(overrides=overrides)
    splits = load_data(cfg.data, seed=0, validation_size=cfg.train.validation_size)
    adapted = adapt(tiny_model("gpt2", tokenizer), tokenizer, method, cfg)
    examples = [encode_example(tokenizer, e, cfg.data) for e in splits.train]
    validate = validation(tokenizer, splits.validation, cfg.data, cfg.eval, CPU, FP32, rouge=cfg.train.eval_rouge)
    return adapted, examples, cfg, splits, validate


def run(tokenizer, adapted, examples, cfg, validate, run_dir=None, **kwargs):
    env = train_module.TrainEnv(CPU, FP32, tokenizer.pad_token_id, folder=run_dir, progress=False)
    return train_module.train(adapted, examples, cfg.train, cfg.method_lr(adapted.name), env, validate=validate,
                              **kwargs)


def checkpoint_weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "tensors.safetensors"))
    return {k.removeprefix("weight/"): v for k, v in tensors.items() if k.startswith("weight/")}


def with_weights(tokenizer, cfg, method: str, weights: dict):
    adapted = adapt(tiny_model("gpt2", tokenizer), tokenizer, method, cfg)
    with torch.no_grad():
        for name, p in adapted.named_trainable().items():
            p.copy_(weights[name])
    adapted.model.eval()
    return adapted


# ---------------------------------------------------------------- the validation subset


def test_validation_examples_are_apart_from_the_scored_ones_and_an_overlap_is_stated(data):
    cfg = load_config(overrides={"data.source": str(data), "data.eval_size": 4, "data.train_eval_size": 0})
    scored = load_data(cfg.data, seed=3).eval
    splits = load_data(cfg.data, seed=3, validation_size=8)  # 4 + 8 = the 12 eval rows: still apart
    assert [e.id for e in splits.eval] == [e.id for e in scored]  # validation leaves the scored subset as it was
    assert not {e.id for e in splits.validation} & {e.id for e in splits.eval}
    assert splits.info["validation_examples"] == 8 and splits.info["validation_overlap"] == 0
    assert validation_note(splits.info) is None
    short = load_data(cfg.data, seed=3, validation_size=10)  # 2 rows short: topped up from the scored subset
    assert len({e.id for e in short.validation}) == 10
    assert len({e.id for e in short.validation} & {e.id for e in short.eval}) == 2 == short.info["validation_overlap"]
    assert "2 of the 10 validation examples are also scored" in validation_note(short.info)
    examples = [Example(str(i), "d", "s") for i in range(5)]
    assert validation_subset(examples, 0, 5, seed=0)[1] == 0  # nothing scored: the whole split is free
    with pytest.raises(Exception, match="train.eval_size: asked for 6 validation examples"):
        validation_subset(examples, 2, 6, seed=0)


# ---------------------------------------------------------------- points, early stopping, keep_best


def test_points_come_every_n_steps_and_equal_scoring_those_weights(tokenizer, data, tmp_path):
    adapted, examples, cfg, splits, validate = setup(tokenizer, data, eval_every=2, checkpoint_every=2,
                                                     keep_checkpoints=10, eval_rouge=True, epochs=2, max_steps=11)
    result = run(tokenizer, adapted, examples, cfg, validate, run_dir=tmp_path)
    points = result["validation"]
    assert [p["step"] for p in points] == [2, 4, 6, 8, 10, 11]  # every 2 steps, and the last one
    assert [p["epoch"] for p in points] == [1, 1, 1, 2, 2, 2]
    for point in points[:-1]:  # steps with a checkpoint (the last step's is the trained model itself)
        scored = with_weights(tokenizer, cfg, "lora", checkpoint_weights(tmp_path, point["step"]))
        loss, tokens = mean_loss(scored, tokenizer, splits.validation, cfg.data, cfg.eval.batch_size, CPU, FP32)
        assert (point["loss"], point["tokens"]) == (loss, tokens)
    scores = evaluate(adapted, tokenizer, splits.validation, cfg.data, cfg.eval, CPU, FP32)
    assert points[-1]["loss"] == scores["loss"]
    assert {k: points[-1][k] for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")} == \
        {k: v["mean"] for k, v in scores["rouge"].items()}
    state = json.loads((tmp_path / "checkpoints" / "step-00000011" / "state.json").read_text())
    assert state["validation"] == points  # checkpointed with the run


def test_validation_rouge_is_evaluates_rouge(tokenizer, data):
    """The ROUGE of a validation point is evaluate's mean, on summaries generated with the eval settings: checked
    where it is not zero, against references that are the model's own summaries of the first documents."""
    adapted, _, cfg, splits, _ = setup(tokenizer, data, eval_every=1)
    adapted.model.eval()
    made = generate(adapted, tokenizer, [e.document for e in splits.validation], cfg.data, cfg.eval, CPU, FP32)
    examples = [Example(e.id, e.document, made[i] if i < 3 else e.summary) for i, e in enumerate(splits.validation)]
    point = validation(tokenizer, examples, cfg.data, cfg.eval, CPU, FP32, rouge=True)(adapted)
    scores = evaluate(adapted, tokenizer, examples, cfg.data, cfg.eval, CPU, FP32)
    assert point["rouge1"] == scores["rouge"]["rouge1"]["mean"] > 0  # where references are the summaries made
    assert point["loss"] == scores["loss"]


def test_validating_changes_nothing_in_training(tokenizer, data):
    """Dropout off and back on, no random numbers drawn: with LoRA dropout the run trains exactly as without."""
    plain = setup(tokenizer, data, epochs=2)
    validated = setup(tokenizer, data, epochs=2, eval_every=3, eval_rouge=True)
    a = run(tokenizer, *plain[:3], None)
    b = run(tokenizer, *validated[:3], validated[4])
    assert len(b["validation"]) == 4 and a["loss_curve"] == b["loss_curve"]
    assert max_diff(plain[0].named_trainable(), validated[0].named_trainable()) == 0
    assert "validation" not in a  # nothing new in the results of a run without validation


def test_early_stopping_stops_after_patience_points_without_improvement(tokenizer, data, tmp_path):
    adapted, examples, cfg, _, validate = setup(tokenizer, data, "finetune", eval_every=2, early_stopping_patience=2,
                                                epochs=4)
    result = run(tokenizer, adapted, examples, cfg, validate)
    points = result["validation"]
    losses = [p["loss"] for p in points]
    assert losses == sorted(losses) and losses[0] < losses[-1]  # the loss rises from the first point on
    assert [p["step"] for p in points] == [2, 4, 6]  # the best (step 2), then 2 points without improvement
    assert result["steps"] == 6 < 4 * 6 and result["stopped_early"] and result["best_step"] == 2
    assert result["weights_step"] == 6  # without keep_best, the result is the last step's
    assert result["epochs"][-1]["batches"] == 6  # a whole epoch: stopping ended it at its last step


def test_keep_best_restores_the_best_steps_weights(tokenizer, data, tmp_path):
    adapted, examples, cfg, _, validate = setup(tokenizer, data, "finetune", eval_every=2, early_stopping_patience=2,
                                                keep_best=True, epochs=4, checkpoint_every=2, keep_checkpoints=10)
    result = run(tokenizer, adapted, examples, cfg, validate, run_dir=tmp_path)
    assert result["best_step"] == result["weights_step"] == 2 and result["steps"] == 6
    best, last = checkpoint_weights(tmp_path, 2), checkpoint_weights(tmp_path, 6)
    assert max_diff(adapted.named_trainable(), best) == 0
    assert max_diff(best, last) > 1e-3  # the kept weights are not the last step's


def test_a_validation_budget_does_not_count_validating(tokenizer, data):
    """Time spent validating is not training time: a validation that takes 1,000 s leaves a 20 s budget intact."""
    ticks = [0.0]

    def clock():
        ticks[0] += 1.0
        return ticks[0]

    adapted, examples, cfg, _, validate = setup(tokenizer, data, budget_seconds=20, eval_every=2)

    def slow(model):
        ticks[0] += 1000.0
        return validate(model)

    result = run(tokenizer, adapted, examples, cfg, slow, clock=clock)
    assert len(result["validation"]) >= 2
    assert 20 <= result["seconds"] < 50  # without the exclusion: over 2,000


class StopBefore(threading.Event):
    """A stop request that arrives once `steps` optimizer steps are done."""

    def __init__(self, steps: int):
        super().__init__()
        self.asked, self.steps = 0, steps

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.steps


def test_a_resumed_run_has_the_same_weights_and_validation_history(tokenizer, data, tmp_path):
    settings = dict(eval_every=2, early_stopping_patience=2, keep_best=True, epochs=2, checkpoint_every=1)
    whole_model, examples, cfg, _, validate = setup(tokenizer, data, "lora", **settings)
    whole = run(tokenizer, whole_model, examples, cfg, validate)
    cut, examples, cfg, _, validate = setup(tokenizer, data, "lora", **settings)
    with pytest.raises(train_module.TrainingInterrupted):
        run(tokenizer, cut, examples, cfg, validate, run_dir=tmp_path, stop=StopBefore(5))
    resumed_model, examples, cfg, _, validate = setup(tokenizer, data, "lora", **settings)
    seen = []
    resumed = run(tokenizer, resumed_model, examples, cfg, validate, run_dir=tmp_path,
                  on_step=lambda row, point: seen.append((row["step"], point and point["step"])))
    assert resumed["resumed_from_step"] == 5
    assert resumed["validation"] == whole["validation"] and resumed["loss_curve"] == whole["loss_curve"]
    assert (resumed["best_step"], resumed["weights_step"]) == (whole["best_step"], whole["weights_step"])
    assert max_diff(resumed_model.named_trainable(), whole_model.named_trainable()) == 0
    # A listener (a tracker) of the resumed run sees the whole history: the restored rows first, then the rest.
    assert [s for s, _ in seen] == list(range(1, whole["steps"] + 1))
    assert [p for _, p in seen if p] == [p["step"] for p in whole["validation"]]


def test_a_checkpoint_of_other_validation_settings_is_refused(tokenizer, data, tmp_path):
    adapted, examples, cfg, _, validate = setup(tokenizer, data, eval_every=2, checkpoint_every=2)
    with pytest.raises(train_module.TrainingInterrupted):
        run(tokenizer, adapted, examples, cfg, validate, run_dir=tmp_path, stop=StopBefore(3))
    adapted, examples, cfg, _, validate = setup(tokenizer, data, eval_every=3, checkpoint_every=2)
    with pytest.raises(Exception, match="train.eval_every: 2 -> 3"):
        run(tokenizer, adapted, examples, cfg, validate, run_dir=tmp_path)


# ---------------------------------------------------------------- the command line and the report


@pytest.mark.parametrize("flags, message", [
    (["--train.keep_best", "true"], "train.keep_best needs validation points: set train.eval_every N"),
    (["--train.early_stopping_patience", "2"], "train.early_stopping_patience needs validation points"),
    (["--train.eval_every", "-1"], "train.eval_every must be >= 0"),
    (["--train.eval_every", "2", "--train.eval_size", "13"], "asked for 13 validation examples but the eval split "
                                                              "has 12 usable rows"),
])
def test_bad_validation_settings_are_refused(flags, message, tiny_model_dirs, data, tmp_path, capsys):
    args = ["train", "--method", "lora", "--model", tiny_model_dirs["gpt2"], "--random-init", "--data", data,
            "--out", tmp_path / "x", "--eval-size", "0", "--data.train_eval_size", "0", *flags]
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_fsdp_refuses_validation_for_now():
    from peftsum.core.session import check_fsdp
    from peftsum.errors import UserError

    cfg = load_config(overrides={"methods": "finetune", "finetune.all": "true", "train.eval_every": 5})
    with pytest.raises(UserError, match="not yet: validation during training"):
        check_fsdp(cfg)


def test_a_comparison_reports_validation_and_kept_weights(tiny_model_dirs, data, tmp_path):
    out = tmp_path / "run"
    args = ["compare", "--model", tiny_model_dirs["gpt2"], "--random-init", "--data", data, "--out", out,
            "--methods", "finetune", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens",
            "12", "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "4", "--epochs", "4",
            "--eval.max_new_tokens", "6", "--eval.bootstrap_samples", "20", "--finetune.lr", "1e-2",
            "--train.eval_every", "2", "--train.eval_size", "6", "--train.early_stopping_patience", "2",
            "--train.keep_best", "true", "--train.checkpoint_every", "0"]
    assert main([str(a) for a in args]) == 0
    results = json.loads((out / "results.json").read_text())
    training = results["methods"]["finetune"]["training"]
    assert (training["best_step"], training["weights_step"], training["steps"]) == (2, 2, 6)
    assert results["data"]["validation_examples"] == 6 and results["data"]["validation_overlap"] == 0
    logged = [json.loads(line) for line in (out / "finetune" / "validation_log.jsonl").read_text().splitlines()]
    assert logged == training["validation"]
    text = (out / "report.md").read_text()
    assert text == render_markdown(results)
    assert "## Validation during training" in text and "apart from the 4 scored eval examples" in text
    assert "| finetune | 3 | 2 | " in text and "| yes, at step 6 | step 2 (best) |" in text
    assert '"after" scores the weights of the best validation point (train.keep_best), not of the last step: ' \
           "step 2 of 6." in text
    card = (out / "finetune" / "README.md").read_text()
    assert "(3 points, stopped early); these are the weights of step 2, the best validation loss" in card
    ax = loss_figure(results).axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "finetune validation loss" in labels and "finetune: weights kept (step 2)" in labels
    drawn = next(line for line in ax.get_lines() if line.get_label() == "finetune validation loss")
    assert list(drawn.get_xdata()) == [2, 4, 6] and list(drawn.get_ydata()) == [p["loss"] for p in logged]

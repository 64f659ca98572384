"""Reliability: interrupted runs resume to the same weights, finished results are never clobbered, bad input and
numerical faults end in one line and exit code 2. Tiny random-init models; real subprocesses where a signal or the
command line itself is what is tested."""

import itertools
import json
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, max_diff, step_losses, tiny_config, trained_weights, write_tiny_data
from hypothesis import given, settings
from hypothesis import strategies as st

from peftsum.cli import main
from peftsum.config import DataConfig
from peftsum.core.data import load_split
from peftsum.training import checkpoint
from peftsum.training import train as train_module

# 24 training examples in batches of 4 for 2 epochs: 12 steps.
TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.epochs", "2", "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "0",
        "--prompt.num_virtual_tokens", "4"]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftsum", *map(str, args)], capture_output=True, text=True, env=ENV)




def last_line(text: str) -> str:
    return text.strip().split("\n")[-1]  # progress bars come before it


def on_training_forward(monkeypatch, call: int, action) -> None:
    """Run `action(loss)` on the `call`-th forward pass of training (evaluation is not counted)."""
    real, calls = train_module.summary_loss, itertools.count(1)

    def loss(adapted, batch, *rest):
        value, n = real(adapted, batch, *rest)
        return (action(value) if next(calls) == call else value), n

    monkeypatch.setattr(train_module, "summary_loss", loss)


def ctrl_c(value):
    signal.raise_signal(signal.SIGINT)  # a real SIGINT, handled exactly as one from the terminal
    return value


# ---------------------------------------------------------------- checkpoint files

def test_only_complete_checkpoints_count_and_the_newest_k_are_kept(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    for step in (1, 2, 3):
        param.grad = torch.full((3,), float(step))
        optimizer.step()
        tensors, meta = checkpoint.optimizer_state(optimizer)
        checkpoint.save(tmp_path, step, {"weight/p": param, **tensors}, {"step": step, "optimizer": meta}, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step-00000009-1").mkdir()  # a writer killed before its rename
    (tmp_path / "checkpoints" / "step-00000008").mkdir()  # no state.json: not a checkpoint
    assert [p.name for p in checkpoint.complete(tmp_path)] == ["step-00000002", "step-00000003"]
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    checkpoint.prune(tmp_path, keep=2)
    assert not (tmp_path / "checkpoints" / ".tmp-step-00000009-1").exists()

    tensors, state = checkpoint.load(checkpoint.latest(tmp_path))
    twin = torch.nn.Parameter(tensors["weight/p"].clone())
    restored = torch.optim.AdamW([twin], lr=0.1)
    checkpoint.load_optimizer_state(restored, tensors, state["optimizer"])
    for p, opt in ((param, optimizer), (twin, restored)):
        p.grad = torch.full((3,), 0.5)
        opt.step()
    assert torch.equal(param, twin)  # the moments came back exactly

    rng_tensors, rng_meta = checkpoint.rng_state()
    draws = torch.rand(4), random.random(), np.random.rand()
    checkpoint.set_rng_state(rng_tensors, rng_meta)
    assert torch.equal(torch.rand(4), draws[0]) and random.random() == draws[1] and np.random.rand() == draws[2]


# ---------------------------------------------------------------- interruption and resume

def test_sigkilled_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_model_dirs, tiny_data, tmp_path, capsys):
    args = ["train", "--method", "lora", "--model", tiny_model_dirs["gpt2"], "--data", tiny_data, *TINY,
            "--lora.dropout", "0.1", "--lora.lr", "5e-4", "--train.checkpoint_every", "2"]
    args = [str(a) for a in args]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "peftsum", *args, "--out", str(killed)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while checkpoint.latest(killed) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)  # a no-op if it already finished: the next line then fails
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists()  # killed mid-run, before the final save
    assert 2 <= int(checkpoint.latest(killed).name[5:]) < 12

    assert main([*args, "--out", str(killed), "--resume", "--lora.lr", "1e-3"]) == 2  # not what was checkpointed
    assert "was written with other settings (lora.lr: 0.0005 -> 0.001)" in capsys.readouterr().err
    assert main([*args, "--out", str(killed), "--resume", "--data.max_summary_tokens", "10"]) == 2
    assert "was trained on other examples" in capsys.readouterr().err
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert max_diff(trained_weights(killed), trained_weights(tmp_path / "whole")) < 1e-6
    assert step_losses(killed) == step_losses(tmp_path / "whole") and len(step_losses(killed)) == 12
    assert not (killed / "checkpoints").exists()  # finished: nothing left to resume


@pytest.mark.parametrize("method, kind, extra", [
    ("lora", "llama", ["--lora.dropout", "0.1", "--precision", "bf16"]),
    ("prompt", "llama", ["--train.checkpoint_every", "0"]),  # the interrupt itself writes the only checkpoint
    ("finetune", "gpt2", ["--finetune.last_blocks", "1", "--train.grad_accum", "2"]),
])
def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes_it(method, kind, extra, tiny_model_dirs, tiny_data,
                                                                      tmp_path, monkeypatch, capsys):
    args = ["train", "--method", method, "--model", str(tiny_model_dirs[kind]), "--data", str(tiny_data), *TINY,
            "--train.checkpoint_every", "2", *extra]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    on_training_forward(monkeypatch, 9, ctrl_c)  # in epoch 2
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    message = last_line(capsys.readouterr().err)
    step = (9 + 1) // 2 if "--train.grad_accum" in extra else 9
    assert f"interrupted at step {step}; checkpoint saved in {tmp_path / 'cut' / 'checkpoints'}" in message
    assert checkpoint.latest(tmp_path / "cut").name == f"step-{step:08d}"
    command = shlex.split(message.split("resume with: ")[1])
    assert command[0] == "peftsum" and command[-1] == "--resume"

    monkeypatch.undo()
    assert main(command[1:]) == 0
    assert f"resuming {method} from" in capsys.readouterr().out
    assert max_diff(trained_weights(tmp_path / "cut"), trained_weights(tmp_path / "whole")) < 1e-6
    assert step_losses(tmp_path / "cut") == step_losses(tmp_path / "whole")


def test_training_twice_gives_identical_losses_and_weights(tiny_model_dirs, tiny_data, tmp_path):
    args = ["train", "--method", "lora", "--model", str(tiny_model_dirs["llama"]), "--data", str(tiny_data), *TINY,
            "--lora.dropout", "0.2", "--max-steps", "6"]
    for run in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / run)]) == 0
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b") and len(step_losses(tmp_path / "a")) == 6
    assert max_diff(trained_weights(tmp_path / "a"), trained_weights(tmp_path / "b")) == 0.0


def test_compare_resumes_without_redoing_finished_work_and_is_deterministic(tiny_model_dirs, tmp_path, monkeypatch,
                                                                           capsys):
    from peftsum.training import recipe

    data = write_tiny_data(tmp_path / "data")
    with (data / "train.jsonl").open("a") as f:  # rows to skip: an empty document, a whitespace-only summary
        f.write('{"document": "", "summary": "x"}\n{"document": "some text", "summary": " \\t\\u3000"}\n')
    with (data / "validation.jsonl").open("a") as f:
        f.write('{"document": "\\n", "summary": "x"}\n')
    args = ["compare", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(data), "--methods", "lora,prompt",
            *TINY, "--train.epochs", "1", "--data.train_eval_size", "4", "--eval-size", "4",
            "--eval.max_new_tokens", "8", "--eval.bootstrap_samples", "50", "--train.checkpoint_every", "2"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert "skipped 3 rows with an empty document or summary (2 in train, 1 in validation)" in capsys.readouterr().out

    # lora trains 6 steps (24 examples, batch 4, 1 epoch); Ctrl-C in prompt's 3rd step.
    cut = tmp_path / "cut"
    on_training_forward(monkeypatch, 6 + 3, ctrl_c)
    assert main([*args, "--out", str(cut)]) == 130
    assert (cut / "lora" / "metrics.json").is_file() and not (cut / "prompt" / "metrics.json").exists()
    assert checkpoint.latest(cut / "prompt").name == "step-00000003"

    monkeypatch.undo()
    scored, forwards = [], []
    real_evaluate, real_loss = recipe.evaluate, train_module.summary_loss

    def evaluate(*args, **kwargs):
        scored.append(kwargs["desc"])
        return real_evaluate(*args, **kwargs)

    def summary_loss(*args):
        forwards.append(1)
        return real_loss(*args)

    monkeypatch.setattr(recipe, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "summary_loss", summary_loss)
    assert main([*args, "--out", str(cut)]) == 0  # the same command again: resumes by itself
    assert scored == ["prompt train", "prompt eval"]  # the baseline and lora were read back, not recomputed
    assert len(forwards) == 6 - 3  # prompt trained only its remaining steps

    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((cut / "results.json").read_text())
    assert resumed["data"]["skipped"] == 3 and resumed["methods"]["prompt"]["training"]["resumed_from_step"] == 3
    for method in ("lora", "prompt"):
        assert resumed["methods"][method]["after"] == whole["methods"][method]["after"]
        assert step_losses(cut / method) == step_losses(tmp_path / "whole" / method)
        assert not (cut / method / "checkpoints").exists()
    # Baseline and lora were computed from scratch by both runs: identical files show that compare is deterministic.
    for folder in ("baseline", "lora", "prompt"):
        for split in ("train", "eval"):
            name = f"{folder}/predictions_{split}.jsonl"
            assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name

    capsys.readouterr()
    assert main([*args, "--out", str(cut)]) == 2  # finished now: not redone, not overwritten
    message = capsys.readouterr().err
    assert "already holds a finished comparison" in message and "--overwrite" in message and "--resume" in message
    assert main([*args, "--out", str(cut), "--eval-size", "3", "--resume"]) == 2
    assert "other settings (data.eval_size: 4 -> 3)" in capsys.readouterr().err


# ---------------------------------------------------------------- finished results are not clobbered

def test_a_finished_train_run_is_kept_unless_overwrite(tiny_model_dirs, tiny_data, tmp_path):
    out = tmp_path / "lora"
    args = ["train", "--method", "lora", "--model", tiny_model_dirs["gpt2"], "--data", tiny_data, *TINY,
            "--max-steps", "2", "--out", out]
    assert main([str(a) for a in args]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()

    again = cli(*args, "--lora.lr", "1e-2")
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert all(part in again.stderr for part in ("already holds a finished run", "--overwrite", "--resume"))
    assert (out / "adapter_model.safetensors").read_bytes() == before

    assert main([str(a) for a in args] + ["--resume"]) == 0  # nothing left to do, and nothing touched
    assert (out / "adapter_model.safetensors").read_bytes() == before

    with pytest.raises(SystemExit) as both:
        main([str(a) for a in args] + ["--resume", "--overwrite"])
    assert both.value.code == 2

    assert main([str(a) for a in args] + ["--lora.lr", "1e-2", "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


# ---------------------------------------------------------------- numerical faults

def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_model_dirs, tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    out = tmp_path / "run"
    on_training_forward(monkeypatch, 5, lambda loss: loss * float("nan"))
    assert main(["train", "--method", "lora", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(tiny_data),
                 *TINY, "--train.checkpoint_every", "2", "--out", str(out)]) == 2
    message = last_line(capsys.readouterr().err)
    assert message.startswith("peftsum: error: training stopped: the loss (nan) is not finite at step 5 (epoch 1)")
    assert f"last good checkpoint is {out / 'checkpoints' / 'step-00000004'}" in message
    assert "--lora.lr" in message
    tensors, _ = checkpoint.load(checkpoint.latest(out))
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert not (out / "adapter_model.safetensors").exists()


def test_losses_read_every_few_steps_give_the_same_log_and_the_same_stop(tiny_model_dirs, tiny_data, tmp_path,
                                                                         monkeypatch, capsys):
    """The GPU's way (losses read every few steps, a non-finite step's update skipped on the device by the fused
    AdamW), run on the CPU: the same per-step losses, and a NaN stops the run at its own step, weights untouched."""
    base = ["train", "--method", "lora", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(tiny_data), *TINY,
            "--train.checkpoint_every", "2", "--max-steps", "6"]
    assert main([*base, "--out", str(tmp_path / "every")]) == 0
    monkeypatch.setitem(train_module.LOSS_READ_EVERY, "cpu", 3)
    assert main([*base, "--out", str(tmp_path / "lazy")]) == 0
    every, lazy = (json.loads((tmp_path / f / "train_log.jsonl").read_text().splitlines()[-1]) for f in ("every", "lazy"))
    assert lazy["step"] == every["step"] == 6 and lazy["loss"] == pytest.approx(every["loss"], rel=1e-5)

    out = tmp_path / "nan"
    on_training_forward(monkeypatch, 5, lambda loss: loss * float("nan"))
    assert main([*base, "--out", str(out)]) == 2
    message = last_line(capsys.readouterr().err)
    assert message.startswith("peftsum: error: training stopped: the loss (nan) is not finite at step 5 (epoch 1)")
    assert f"last good checkpoint is {out / 'checkpoints' / 'step-00000004'}" in message
    tensors, _ = checkpoint.load(checkpoint.latest(out))
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_a_diverging_learning_rate_is_caught(tiny_model_dirs, tiny_data, tmp_path, capsys):
    code = main(["train", "--method", "finetune", "--finetune.all", "true", "--finetune.lr", "1e12", "--model",
                 str(tiny_model_dirs["gpt2"]), "--data", str(tiny_data), *TINY, "--out", str(tmp_path / "run")])
    assert code == 2
    assert "is not finite at step" in last_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "finetuned.safetensors").exists()


# ---------------------------------------------------------------- bad input: one line, exit code 2

def _write(folder: Path, name: str, content) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())


BAD_DATA = {  # case -> (train file, its content, message)
    "malformed-jsonl": ("train.jsonl", '{"document": "a", "summary": "b"}\n{"document": \n',
                        "line 2 is not valid JSON"),
    "csv-unknown-columns": ("train.csv", "title,body\nbuses,new rules\n",
                            "pass --document-column (available: title, body)"),
    "non-utf8-jsonl": ("train.jsonl", b'{"document": "caf\xe9", "summary": "x"}\n', "not UTF-8 text"),
    "non-utf8-csv": ("train.csv", b"document,summary\ncaf\xe9,x\n", "not UTF-8 text"),
}


@pytest.mark.parametrize("case, flags, message", [
    *[(case, [], message) for case, (_, _, message) in BAD_DATA.items()],
    ("too-small", ["--train-size", "50"], "asked for 50 examples but the split has 24 usable rows"),
    ("beyond-context", ["--max-length", "512"], "data.max_length (512) exceeds the context of model"),
    ("prompt-too-long", ["--template", "{document} " + "please summarize the council news for the riders " * 8],
     "leaving no room for the document"),
])
def test_bad_input_is_refused_in_one_line(case, flags, message, tiny_model_dirs, tiny_data, tmp_path):
    data = tiny_data
    if case in BAD_DATA:
        name, content, _ = BAD_DATA[case]
        data = tmp_path / case
        _write(data, name, content)
        (data / "validation.jsonl").write_text((tiny_data / "validation.jsonl").read_text())
    result = cli("train", "--method", "lora", "--model", tiny_model_dirs["gpt2"], "--data", data, *TINY, *flags,
                 "--out", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained_runs(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """A one-step LoRA run on the tiny GPT-2, and one on a wider GPT-2 (a different base model size)."""
    root = tmp_path_factory.mktemp("trained")
    data = write_tiny_data(root / "data")
    wider = root / "gpt2-wide"
    config = tiny_config("gpt2", len(make_tokenizer()))
    config.n_embd = 48
    config.save_pretrained(wider)
    make_tokenizer().save_pretrained(wider)
    runs = {}
    for name, model in (("small", tiny_model_dirs["gpt2"]), ("wide", wider)):
        runs[name] = root / name
        assert main(["train", "--method", "lora", "--model", str(model), "--data", str(data), *TINY, "--max-steps",
                     "1", "--eval-size", "2", "--out", str(runs[name])]) == 0
    return runs


@pytest.mark.parametrize("damage, message", [
    ("truncated", "is not a readable safetensors file"),
    ("other-model", "(was the adapter trained on another model?)"),
])
def test_a_damaged_or_foreign_adapter_is_refused_in_one_line(damage, message, trained_runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in trained_runs["small"].iterdir():
        if f.is_file():
            (run / f.name).write_bytes(f.read_bytes())
    adapter = run / "adapter_model.safetensors"
    if damage == "truncated":
        adapter.write_bytes(adapter.read_bytes()[:-100])
    else:
        adapter.write_bytes((trained_runs["wide"] / "adapter_model.safetensors").read_bytes())
    result = cli("evaluate", "--run", run, "--json")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------- data loading, property-based

# Blank to str.strip, as load_split sees it: includes separators that str.splitlines would break lines at.
BLANK = st.sampled_from(["", " ", "\t\n", "\u3000", "\u2028", "\x1c", " \r\n "])
TEXT = st.one_of(st.text(max_size=40), BLANK)


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=8), ascii_only=st.booleans())
def test_any_unicode_jsonl_round_trips_and_blank_rows_are_counted(rows, ascii_only):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        path.write_text("".join(json.dumps({"document": d, "summary": s}, ensure_ascii=ascii_only) + "\n"
                                for d, s in rows), encoding="utf-8")
        examples, info = load_split(DataConfig(source=folder), "train")
    kept = [(str(i), d.strip(), s.strip()) for i, (d, s) in enumerate(rows) if d.strip() and s.strip()]
    assert [(e.id, e.document, e.summary) for e in examples] == kept
    assert info["skipped"] == len(rows) - len(kept)

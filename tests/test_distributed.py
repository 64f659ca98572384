"""Several processes give what one process gives: `torchrun --nproc-per-node 2` (gloo, CPU) against a plain run on the
same global batches, with tiny random-init models in fp32.

Rank 1 runs under an audit hook that fails it on any write into the output folder, and torchrun keeps each rank's
stdout and stderr apart, so the tests also see that rank 0 alone writes files and prints.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_tokenizer, max_diff, step_losses, tiny_config, trained_weights, write_tiny_data

from peftsum.cli import main
from peftsum.training import checkpoint

# 21 training examples in global batches of 4: each epoch ends with a one-example batch, which rank 1 sits out.
# 7 eval examples in batches of 2: 4 batches, 2 per rank, the last one short.
TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train-size", "21", "--train.batch_size", "4", "--train.epochs", "2", "--eval-size", "7",
        "--eval.batch_size", "2", "--data.train_eval_size", "3", "--eval.max_new_tokens", "8",
        "--eval.bootstrap_samples", "50", "--prompt.num_virtual_tokens", "4", "--train.checkpoint_every", "2"]

RANK_GUARD = '''
import os, runpy, sys

guarded = os.path.realpath(os.environ["PEFTSUM_TEST_GUARDED"])
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def inside(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(guarded)
    except TypeError:  # a file descriptor
        return False


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & WRITE)
        touched = [path] if writes else []
    elif event == "os.rename":
        touched = args[:2]
    elif event in ("os.remove", "os.rmdir", "os.mkdir", "os.truncate", "shutil.rmtree", "os.chmod"):
        touched = args[:1]
    else:
        return
    for path in touched:
        if path is not None and inside(path):
            raise RuntimeError(f"rank {os.environ['RANK']} wrote {path} ({event})")


if os.environ.get("RANK", "0") != "0":
    sys.addaudithook(hook)
sys.argv = ["peftsum", *sys.argv[1:]]
runpy.run_module("peftsum", run_name="__main__", alter_sys=True)
'''


ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def torchrun(tmp_path: Path, out: Path, *args, wait: bool = True):
    """`torchrun --nproc-per-node 2 -m peftsum ARGS --out OUT`, rank 1 guarded; each rank's output under out.logs."""
    guard = tmp_path / "rank_guard.py"
    guard.write_text(RANK_GUARD)
    logs = out.with_name(out.name + ".logs")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--log-dir", str(logs), "--redirects", "3", str(guard), *map(str, args), "--out", str(out)]
    process = subprocess.Popen(command, env={**ENV, "PEFTSUM_TEST_GUARDED": str(out)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output + rank_output(out, 0) + rank_output(out, 1)
    return process


def rank_output(out: Path, rank: int, stream: str = "") -> str:
    """What one rank printed (stdout and stderr, or just `stream`) in its latest torchrun attempt."""
    logs = sorted(out.with_name(out.name + ".logs").glob(f"*/attempt_*/{rank}"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return ""
    streams = [stream] if stream else ["stdout", "stderr"]
    return "".join((logs[-1] / f"{s}.log").read_text() for s in streams if (logs[-1] / f"{s}.log").is_file())




def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("data") / "tiny", n_train=24, n_eval=7)


def test_two_processes_train_and_score_like_one(tiny_model_dirs, data, tmp_path):
    args = ["compare", "--model", tiny_model_dirs["llama"], "--data", data, "--methods", "lora,prompt", *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    torchrun(tmp_path, two, *args)

    assert files(two) == files(one)  # the same files, and no partial or temporary ones
    assert not any(name.startswith(".") or "checkpoints" in name for name in files(two))
    for method in ("lora", "prompt"):
        assert max_diff(trained_weights(two / method), trained_weights(one / method)) < 1e-6  # measured: 1e-7 or less
        assert step_losses(two / method) == pytest.approx(step_losses(one / method), abs=1e-5)
        assert len(step_losses(two / method)) == 2 * 6  # ceil(21 / 4) steps per epoch

    validation = [json.loads(line)["id"] for line in (data / "validation.jsonl").read_text().splitlines()]
    for folder in ("baseline", "lora", "prompt"):
        for split in ("train", "eval"):
            name = f"{folder}/predictions_{split}.jsonl"
            assert ids(two / name) == ids(one / name), name  # each example once, in the one-process order
            assert len(set(ids(two / name))) == len(ids(two / name)) == (7 if split == "eval" else 3)
        assert sorted(ids(two / f"{folder}/predictions_eval.jsonl")) == sorted(validation)
    # The untouched model is the same in both runs, and each rank generates whole one-process batches.
    for split in ("train", "eval"):
        name = f"baseline/predictions_{split}.jsonl"
        assert (two / name).read_bytes() == (one / name).read_bytes()
    results = json.loads((two / "results.json").read_text())
    assert results["environment"]["processes"] == 2
    assert results["baseline"] == json.loads((one / "results.json").read_text())["baseline"]
    assert all(results["methods"][m]["after"]["eval"]["n"] == 7 for m in ("lora", "prompt"))

    # Rank 0 speaks once for both; rank 1 says nothing at all (no progress bars either).
    assert rank_output(two, 1) == ""
    assert rank_output(two, 0, "stdout").count("report: ") == 1
    assert "train lora" in rank_output(two, 0, "stderr")


@pytest.mark.parametrize("kind, method, flags", [
    ("llama", "ia3", ["--ia3.lr", "5e-2"]),  # llama: no dropout in the model, whose masks differ per rank
    ("llama", "lora", ["--lora.variant", "dora", "--lora.lr_ratio", "8", "--lora.lr", "5e-3"]),
    ("llama", "lora", ["--lora.init", "pissa", "--lora.variant", "rslora", "--lora.lr", "5e-3"]),
])
def test_two_processes_train_the_new_methods_like_one(kind, method, flags, tiny_model_dirs, data, tmp_path):
    """IA3's vectors and DoRA's magnitudes are trainable tensors like LoRA's, so the gradient all-reduce covers them;
    LoRA+'s parameter groups and PiSSA's residual weights (the same SVD on every rank) change nothing across ranks."""
    args = ["train", "--method", method, *flags, "--model", tiny_model_dirs[kind], "--data", data, *TINY,
            "--eval-size", "0", "--data.train_eval_size", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    torchrun(tmp_path, two, *args)
    assert files(two) == files(one)
    assert max_diff(trained_weights(two), trained_weights(one)) < 1e-6
    assert step_losses(two) == pytest.approx(step_losses(one), abs=1e-5) and len(step_losses(two)) == 2 * 6


def test_fsdp_full_finetuning_matches_one_process(tmp_path, data):
    # GPT-2 ties its LM head to the input embeddings; without dropout, one process and two compute the same thing.
    model = tmp_path / "gpt2-no-dropout"
    config = tiny_config("gpt2", len(make_tokenizer()))
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    config.save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    args = ["train", "--method", "finetune", "--finetune.all", "true", "--finetune.lr", "1e-3", "--model", model,
            "--data", data, *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    torchrun(tmp_path, two, *args, "--fsdp")
    assert files(two) == files(one)
    assert max_diff(trained_weights(two), trained_weights(one)) < 1e-5  # measured: about 1e-6 after 12 full AdamW steps
    assert step_losses(two) == pytest.approx(step_losses(one), abs=1e-5)
    assert "eval loss" in rank_output(two, 0, "stdout") and rank_output(two, 1) == ""


def test_fsdp_is_refused_where_it_does_not_apply(tiny_model_dirs, data, tmp_path, capsys):
    base = ["--model", str(tiny_model_dirs["llama"]), "--data", str(data), *TINY, "--fsdp"]
    assert main(["train", "--method", "lora", *base, "--out", str(tmp_path / "a")]) == 2
    assert "FSDP shards full fine-tuning only" in capsys.readouterr().err
    assert main(["train", "--method", "finetune", "--finetune.all", "true", *base, "--out", str(tmp_path / "b")]) == 2
    assert "start peftsum with torchrun or accelerate launch" in capsys.readouterr().err


@pytest.mark.parametrize("method, flags", [
    ("lora", ["--lora.lr", "5e-3"]),
    ("finetune", ["--finetune.all", "true", "--finetune.lr", "1e-3"]),  # with --fsdp: sharded checkpoints
])
def test_ctrl_c_stops_every_process_at_one_step_and_the_run_resumes(method, flags, tiny_model_dirs, data, tmp_path):
    args = ["train", "--method", method, *flags, "--model", tiny_model_dirs["llama"], "--data", data, *TINY,
            "--train.epochs", "8", "--eval-size", "0", "--data.train_eval_size", "0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*map(str, args), "--out", str(whole)]) == 0
    if method == "finetune":
        args.append("--fsdp")

    process = torchrun(tmp_path, cut, *args, wait=False)
    deadline = time.monotonic() + 120
    while checkpoint.latest(cut) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)  # as Ctrl-C would: torchrun passes it on to both ranks
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0, output
    message = rank_output(cut, 0, "stderr").strip().splitlines()[-1]
    assert "interrupted at step" in message and "--resume" in message, output
    step = int(message.split("interrupted at step ")[1].split(";")[0])
    assert 2 <= step < 8 * 6 and checkpoint.latest(cut).name == f"step-{step:08d}"
    assert rank_output(cut, 1) == ""

    torchrun(tmp_path, cut, *args, "--resume")
    assert f"resuming {method} from {cut / 'checkpoints' / f'step-{step:08d}'}" in rank_output(cut, 0, "stdout")
    assert max_diff(trained_weights(cut), trained_weights(whole)) < 1e-6
    assert step_losses(cut) == pytest.approx(step_losses(whole), abs=1e-5) and len(step_losses(cut)) == 8 * 6
    assert not (cut / "checkpoints").exists()


def test_accelerate_launch_sets_the_precision_and_runs_data_parallel(tiny_model_dirs, data, tmp_path):
    args = ["train", "--method", "lora", "--model", tiny_model_dirs["llama"], "--data", data,
            *[a for a in TINY if a not in ("--precision", "fp32")], "--eval-size", "0", "--data.train_eval_size", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--precision", "bf16", "--out", str(one)]) == 0
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "bf16",
                             "--dynamo_backend", "no", "-m", "peftsum", *map(str, args), "--out", str(two)],
                            env=ENV, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("trained lora: 12 steps") == 1  # printed by rank 0 alone
    assert "precision: bf16" in (two / "config.yaml").read_text()  # accelerate's mixed precision, as no flag set it
    assert files(two) == files(one)
    assert max_diff(trained_weights(two), trained_weights(one)) < 1e-3  # bf16, other padding and rounding: measured 3e-5


def test_two_processes_validate_stop_early_and_keep_the_best_like_one(tiny_model_dirs, tmp_path):
    """Every rank validates its share, all record rank 0's numbers, and all stop at the same step; rank 1 logs
    nothing to the tracker (the audit hook would fail it on any write in the output folder)."""
    data = write_tiny_data(tmp_path / "data", n_train=24, n_eval=12)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    # One summary for every training document: the validation loss rises from the start (see test_validation.py).
    (data / "train.jsonl").write_text("".join(json.dumps({**r, "summary": "council council council"}) + "\n"
                                              for r in rows))
    args = ["train", "--method", "finetune", "--finetune.lr", "1e-2", "--model", tiny_model_dirs["llama"], "--data",
            data, *TINY, "--train-size", "24", "--train.epochs", "4", "--eval-size", "4", "--data.train_eval_size",
            "0", "--train.eval_every", "2", "--train.eval_size", "6", "--train.early_stopping_patience", "2",
            "--train.keep_best", "true", "--report-to", "tensorboard"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([*map(str, args), "--out", str(one)]) == 0
    torchrun(tmp_path, two, *args)
    points = {folder: [json.loads(line) for line in (folder / "validation_log.jsonl").read_text().splitlines()]
              for folder in (one, two)}
    steps = [p["step"] for p in points[one]]
    assert [p["step"] for p in points[two]] == steps and len(steps) >= 3  # (the Llama has no dropout)
    assert [p["loss"] for p in points[two]] == pytest.approx([p["loss"] for p in points[one]], abs=1e-5)
    assert len(step_losses(two)) == len(step_losses(one)) == steps[-1] < 4 * 6  # stopped early, together
    best = min(points[one], key=lambda p: p["loss"])["step"]
    assert best < steps[-1] and f"weights of step {best} (best validation loss)" in rank_output(two, 0, "stdout")
    assert max_diff(trained_weights(two), trained_weights(one)) < 1e-5  # both kept the best step's weights
    assert len(list((two / "tensorboard" / "finetune").glob("events.out.tfevents.*"))) == 1
    assert rank_output(two, 1) == ""

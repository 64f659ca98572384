"""Reliability, round three (issue 30): trained weights holding NaN or inf, files written by a newer peftsum, and
writes cut short.

Each case damages a copy of one tiny trained world (a LoRA run, a fine-tuned run, a LoRA run interrupted at step 3,
tiny random-init models) and runs the command line as a user would (a real process): exit 2, one line naming the file
(and the bad tensors), no traceback, and every file of the case and of the world byte for byte as it was. Then exports,
reports and summaries are written again over earlier ones under a file size limit (`ulimit -f`, what a full disk
does) and killed (SIGKILL) mid-export: the earlier files stay byte for byte as they were.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import max_diff, trained_weights, write_tiny_data
from safetensors.torch import load_file, save_file
from test_bad_inputs import TINY, message_lines, peftsum, snapshot

from peftsum.cli import main
from peftsum.errors import UserError
from peftsum.study.results import SCHEMA_VERSION
from peftsum.training import checkpoint
from peftsum.training import train as train_module


@dataclass
class World:
    root: Path
    gpt2: Path
    data: Path
    lora: Path  # a finished LoRA train run
    finetune: Path  # a finished fine-tuning train run
    interrupted: Path  # a LoRA run interrupted at step 3, holding checkpoint step-00000003
    train_args: list[str]  # what trained `interrupted`, without --out


@pytest.fixture(scope="module")
def world(tiny_model_dirs, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("round3")
    data = write_tiny_data(root / "data")
    base = ["--model", str(tiny_model_dirs["gpt2"]), "--data", str(data), *TINY, "--train.epochs", "1"]
    for method in ("lora", "finetune"):
        assert main(["train", "--method", method, *base, "--max-steps", "2", "--out", str(root / method)]) == 0
    args = ["train", "--method", "lora", *base, "--train.checkpoint_every", "2"]
    real, calls = train_module.summary_loss, iter(range(1, 100))

    def interrupt_at_step_3(adapted, batch, *count):
        if next(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(adapted, batch, *count)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "summary_loss", interrupt_at_step_3)
        assert main([*args, "--out", str(root / "interrupted")]) == 130
    assert checkpoint.latest(root / "interrupted").name == "step-00000003"
    return World(root, tiny_model_dirs["gpt2"], data, root / "lora", root / "finetune", root / "interrupted", args)


# ---------------------------------------------------------------- what each case damages

def poison(file: str, value: float, count: int = 1, prefix: str = "") -> Callable[[Path], Path]:
    """Put `value` (NaN, inf) into the first element of the first `count` floating tensors (whose names start with
    `prefix`) of `file` in a folder; returns the folder."""
    def damage(folder: Path) -> Path:
        path = folder / file
        tensors = load_file(str(path))
        names = sorted(n for n, t in tensors.items() if t.is_floating_point() and n.startswith(prefix))[:count]
        for name in names:
            tensors[name].view(-1)[0] = value
        save_file(tensors, str(path), metadata={"format": "pt"})
        return folder
    return damage


def in_checkpoint(damage: Callable[[Path], object]) -> Callable[[Path], None]:
    return lambda run: damage(checkpoint.latest(run))


def newer_checkpoint(run: Path) -> None:
    path = checkpoint.latest(run) / checkpoint.STATE
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "schema_version": 99, "peftsum_version": "9.9.9"}))


def newer_results(run: Path) -> None:
    """A results.json a future peftsum wrote: its layout is unknown here, only its version is read."""
    run.mkdir(exist_ok=True)
    (run / "results.json").write_text(json.dumps({"schema_version": 99, "peftsum_version": "9.9.9",
                                                  "comparison": {"layout": "unknown"}}))


@dataclass
class Case:
    id: str
    source: str | None  # the world's run copied to {d}/run before `damage`
    damage: Callable[[Path], object]
    args: list[str]  # formatted with {d}, {data}, {gpt2}; "{train_args}" stands for the interrupted run's arguments
    message: str  # found in the one line of stderr


NAN, INF = float("nan"), float("inf")
LORA_FILE = "run/adapter_model.safetensors: non-finite values (NaN or inf) in base_model.model."
RESUME = ["{train_args}", "--out", "{d}/run", "--resume"]
NEWER = f"was written by peftsum schema 99 (peftsum 9.9.9); this peftsum reads schema {SCHEMA_VERSION} and older: " \
        f"upgrade peftsum"
CASES = [
    Case("lora-nan-evaluate", "lora", poison("adapter_model.safetensors", NAN, 2),
         ["evaluate", "--run", "{d}/run", "--eval-size", "2"], LORA_FILE),
    Case("lora-nan-summarize", "lora", poison("adapter_model.safetensors", NAN, 4),
         ["summarize", "--run", "{d}/run", "{data}/train.jsonl"], LORA_FILE),
    Case("lora-nan-export", "lora", poison("adapter_model.safetensors", NAN),
         ["export", "--run", "{d}/run", "--merged", "{d}/merged"], LORA_FILE),
    Case("lora-inf-adapter-folder", "lora", poison("adapter_model.safetensors", -INF),
         ["summarize", "--adapter", "{d}/run", "--model", "{gpt2}", "--random-init", "{data}/train.jsonl"], LORA_FILE),
    Case("finetune-inf-evaluate", "finetune", poison("finetuned.safetensors", INF, 4),
         ["evaluate", "--run", "{d}/run", "--eval-size", "2"],
         "run/finetuned.safetensors: non-finite values (NaN or inf) in "),
    Case("finetune-inf-export", "finetune", poison("finetuned.safetensors", INF),
         ["export", "--run", "{d}/run", "--merged", "{d}/merged"],
         "run/finetuned.safetensors: non-finite values (NaN or inf) in "),
    Case("checkpoint-nan-weights", "interrupted", in_checkpoint(poison("tensors.safetensors", NAN, prefix="weight/")),
         RESUME, "step-00000003/tensors.safetensors: non-finite values (NaN or inf) in weight/"),
    Case("checkpoint-newer-schema", "interrupted", newer_checkpoint, RESUME,
         "step-00000003/state.json was written by peftsum checkpoint schema 99 (peftsum 9.9.9); this peftsum reads "
         f"checkpoint schema {checkpoint.SCHEMA_VERSION} and older: upgrade peftsum"),
    Case("results-newer-report", None, newer_results, ["report", "{d}/run"], f"run/results.json {NEWER}"),
    Case("results-newer-compare-resume", None, newer_results,
         ["compare", "--model", "{gpt2}", "--data", "{data}", *TINY, "--methods", "lora", "--out", "{d}/run",
          "--resume"], f"run/results.json {NEWER}"),
]


@pytest.fixture(scope="module")
def outcomes(world, tmp_path_factory) -> tuple[dict, bool]:
    """Every case run once (each in its own folder): (case id -> (code, stderr, before, after, fields)), and whether
    the world came out of all of them byte for byte as it went in."""
    root = tmp_path_factory.mktemp("round3-cases")
    shared = snapshot(world.root, world.gpt2.parent)

    def run(case: Case):
        d = root / case.id
        d.mkdir()
        if case.source:
            shutil.copytree(getattr(world, case.source), d / "run")
        case.damage(d / "run")
        fields = {"d": d, "data": world.data, "gpt2": world.gpt2}
        args = []
        for arg in case.args:
            args += world.train_args if arg == "{train_args}" else [arg.format(**fields)]
        before = snapshot(d)
        result = peftsum(*args, cwd=d)
        return result.returncode, result.stderr.decode(), before, snapshot(d)

    with ThreadPoolExecutor(max_workers=2) as pool:
        ran = dict(zip([c.id for c in CASES], pool.map(run, CASES)))
    return ran, snapshot(world.root, world.gpt2.parent) == shared


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_damaged_or_newer_file_is_refused_in_one_line_and_nothing_changes(case: Case, outcomes):
    ran, world_unchanged = outcomes
    code, stderr, before, after = ran[case.id]
    lines = message_lines(stderr)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert case.message in lines[0]
    assert after == before  # the damaged inputs as they were, nothing written (no merged folder, no report)
    assert world_unchanged


def test_the_message_names_the_first_bad_tensors_and_counts_them(world, outcomes):
    ran, _ = outcomes
    line = message_lines(ran["lora-nan-evaluate"][1])[0]
    first_two = sorted(load_file(str(world.lora / "adapter_model.safetensors")))[:2]
    total = len(load_file(str(world.lora / "adapter_model.safetensors")))
    assert f"in {', '.join(first_two)} (2 of {total} tensors); the file is damaged or its training diverged" in line
    line = message_lines(ran["lora-nan-summarize"][1])[0]
    assert f"weight, ... (4 of {total} tensors)" in line, line  # three names shown, the rest counted


def test_a_checkpoint_written_before_its_version_was_recorded_still_resumes(world, tmp_path):
    """Checkpoints of earlier peftsum versions have no schema_version: they read as version 1 and resume."""
    run = tmp_path / "run"
    shutil.copytree(world.interrupted, run)
    path = checkpoint.latest(run) / checkpoint.STATE
    state = json.loads(path.read_text())
    assert state["schema_version"] == checkpoint.SCHEMA_VERSION  # what new checkpoints carry
    path.write_text(json.dumps({k: v for k, v in state.items() if k not in ("schema_version", "peftsum_version")}))
    assert main([*world.train_args, "--out", str(run), "--resume"]) == 0
    uninterrupted = tmp_path / "uninterrupted"
    assert main([*world.train_args, "--out", str(uninterrupted)]) == 0
    assert max_diff(trained_weights(run), trained_weights(uninterrupted)) == 0.0


def test_finite_weights_load_unchanged():
    """The check reads, never alters: finite weights (and integer tensors such as RNG states) pass as they are."""
    from peftsum.infra.files import refuse_non_finite

    # "big" and "half" sum past their type's largest value: finite all the same
    tensors = {"w": torch.randn(3, 3), "rng": torch.zeros(5, dtype=torch.uint8), "big": torch.full((2,), 3e38),
               "half": torch.full((4,), 60000.0, dtype=torch.float16), "empty": torch.zeros(0)}
    copies = {k: v.clone() for k, v in tensors.items()}
    refuse_non_finite(tensors, Path("x.safetensors"))
    assert all(torch.equal(tensors[k], copies[k]) for k in tensors)
    with pytest.raises(UserError, match=r"x.safetensors: non-finite values \(NaN or inf\) in half \(1 of 5 tensors\)"):
        refuse_non_finite({**tensors, "half": torch.tensor([1.0, float("-inf")], dtype=torch.float16)},
                          Path("x.safetensors"))


# ---------------------------------------------------------------- a full disk mid-write leaves the previous file

def file_size_limit(limit: int) -> str:
    """A prelude capping every file the process writes at `limit` bytes (what `ulimit -f` does): a write past it
    fails with EFBIG, as a full disk fails with ENOSPC (Python ignores SIGXFSZ, which would otherwise kill it)."""
    return f"import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"


@pytest.mark.parametrize("target", ["--merged", "--gguf"])
def test_an_export_cut_short_by_the_file_size_limit_leaves_the_previous_export(world, tmp_path, target):
    out = tmp_path / ("merged" if target == "--merged" else "model.gguf")
    first = peftsum("export", "--run", world.lora, target, out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr.decode()
    before = snapshot(tmp_path)
    again = peftsum("export", "--run", world.lora, target, out, "--overwrite", cwd=tmp_path,
                    prelude=file_size_limit(16_384))
    lines = [line for line in message_lines(again.stderr.decode()) if "peftsum: error:" in line
             or "byte/s]" not in line]  # the GGUF writer's progress bar stays where the write failed
    assert again.returncode == 2, again.stderr.decode()
    assert "Traceback" not in again.stderr.decode()
    assert len(lines) == 1 and f"cannot write {out}: " in lines[0] and f"; {out} is as it was" in lines[0], lines
    assert "File too large" in lines[0] or "file size limit" in lines[0], lines
    assert snapshot(tmp_path) == before  # the previous export whole, nothing half-written beside it


def test_a_report_or_summaries_cut_short_by_the_file_size_limit_leave_the_previous_files(world, tmp_path):
    run = tmp_path / "run"
    assert main(["compare", "--model", str(world.gpt2), "--data", str(world.data), *TINY, "--methods", "lora",
                 "--max-steps", "2", "--out", str(run)]) == 0
    output = tmp_path / "summaries.jsonl"
    first = peftsum("summarize", "--run", run / "lora", "--input", world.data / "validation.jsonl", "--output", output,
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr.decode()
    before = snapshot(tmp_path)
    # results.json, report.md and the charts are a few KB; report.html embeds the charts and runs past the limit.
    cut = peftsum("report", run, cwd=tmp_path, prelude=file_size_limit(16_384))
    lines = message_lines(cut.stderr.decode())
    assert cut.returncode == 2 and len(lines) == 1, cut.stderr.decode()
    assert "cannot write" in lines[0] and "File too large" in lines[0], lines
    again = peftsum("summarize", "--run", run / "lora", "--input", world.data / "validation.jsonl", "--output",
                    output, cwd=tmp_path, prelude=file_size_limit(64))
    errors = [line for line in message_lines(again.stderr.decode()) if "error" in line]  # after a truncation note
    assert again.returncode == 2 and len(errors) == 1 and "Traceback" not in again.stderr.decode(), again.stderr
    assert f"cannot write {output}: File too large; the 8 summaries went to standard output" in errors[0], errors
    assert len(again.stdout.decode().splitlines()) == 8  # not lost
    assert snapshot(tmp_path) == before  # every earlier file byte for byte, nothing half-written beside them


# The export stops for good once its new files are written but not yet in place, and says so in a file: the moment
# a SIGKILL (a preempted job, an out-of-memory kill) is sent.
STOP_BEFORE_RENAME = '''
import pathlib, time
import peftsum.outputs.{module} as written
real = written.fsync
def stop(path):
    real(path)
    pathlib.Path("{marker}").touch()
    time.sleep(300)
written.fsync = stop
'''


@pytest.mark.parametrize("target", ["--merged", "--gguf"])
def test_an_export_killed_mid_write_leaves_the_previous_export(world, tmp_path, target):
    out = tmp_path / ("merged" if target == "--merged" else "model.gguf")
    first = peftsum("export", "--run", world.lora, target, out, cwd=tmp_path)
    assert first.returncode == 0, first.stderr.decode()
    before = snapshot(out) if out.is_dir() else {"file": snapshot(tmp_path)[str(out)]}
    marker = tmp_path / "written"
    module = "export" if target == "--merged" else "gguf_export"
    process = peftsum("export", "--run", world.lora, target, out, "--overwrite", cwd=tmp_path, popen=True,
                      prelude=STOP_BEFORE_RENAME.format(module=module, marker=marker))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), process.communicate()[1].decode()
        process.kill()
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    after = snapshot(out) if out.is_dir() else {"file": snapshot(tmp_path)[str(out)]}
    assert after == before  # the previous export whole: the new one was never moved in
    staged = [p.name for p in tmp_path.glob(f".{out.name}-{process.pid}*")]
    assert len(staged) == 1  # what the killed export had staged, a model's size: the next export removes it
    again = peftsum("export", "--run", world.lora, target, out, "--overwrite", cwd=tmp_path)
    assert again.returncode == 0, again.stderr.decode()
    assert not [p.name for p in tmp_path.glob(f".{out.name}-*")]
    assert (snapshot(out) if out.is_dir() else {"file": snapshot(tmp_path)[str(out)]}) == before  # same weights

"""The bad-input corpus: configs, data files, adapters, checkpoints, output folders, flags and signals, each handed to
the command line as a user would (a real `python -m peftsum` process, tiny random-init models).

Every case asserts the exit code, a message of one line naming the offending file, flag or value, no traceback, and
that every input and earlier result is byte for byte what it was (all files hashed before and after). Most cases fail
before a model loads; the adapter and checkpoint cases share one tiny trained world (a session fixture) and damage a
copy of it. Signals and the run-folder lock are tested between real processes at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import max_diff, step_losses, trained_weights, write_tiny_data
from safetensors.torch import load_file, save_file

from peftsum.cli import main
from peftsum.training import checkpoint
from peftsum.training import train as train_module

ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
# 24 training examples in batches of 4: 6 steps an epoch.
TINY = ["--random-init", "--precision", "fp32", "--data.max_length", "64", "--data.max_summary_tokens", "12",
        "--train.batch_size", "4", "--data.train_eval_size", "0", "--eval-size", "0",
        "--prompt.num_virtual_tokens", "4", "--eval.max_new_tokens", "4", "--eval.bootstrap_samples", "20"]
RUN = '''
import sys
{prelude}
from peftsum.cli import main
sys.exit(main(sys.argv[1:]))
'''
# Training steps slowed down, so that a signal sent from outside lands mid-run.
SLOW_STEPS = '''
import time
import peftsum.training.train as t
real = t.summary_loss
def slow(*args):
    time.sleep(0.15)
    return real(*args)
t.summary_loss = slow
'''


def peftsum(*args, cwd: Path, prelude: str = "", stdin: bytes | None = None, popen: bool = False, **kwargs):
    """`python -m peftsum ARGS` (with `prelude`, Python run first, e.g. to simulate a full disk), in `cwd`."""
    command = [sys.executable, "-c", RUN.format(prelude=prelude), *map(str, args)]
    if popen:
        return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    return subprocess.run(command, cwd=cwd, env=ENV, input=stdin, capture_output=True, timeout=300)


def message_lines(stderr: str) -> list[str]:
    """stderr without progress bars."""
    return [line for line in stderr.splitlines()
            if line.strip() and not any(mark in line for mark in ("it/s]", "s/it]", "it/s, "))]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file and folder under `roots`: a file by its SHA-256, a folder as such."""
    seen = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                seen[str(path)] = "special"
            elif path.is_dir():
                seen[str(path)] = "folder"
            else:
                seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


# ---------------------------------------------------------------- one shared tiny world

@dataclass
class World:
    root: Path
    gpt2: Path
    llama: Path
    data: Path
    lora_run: Path  # a finished LoRA train run
    prompt_run: Path  # a finished prompt-tuning train run
    interrupted: Path  # a LoRA run interrupted at step 3, holding checkpoint step-00000003
    train_args: list[str]  # what trained `interrupted`, without --out


@pytest.fixture(scope="session")
def reference(world, tmp_path_factory) -> Path:
    """`world.train_args` for 2 epochs (12 steps), uninterrupted: the weights every interrupted run must end with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([*world.train_args, "--train.epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def world(tiny_model_dirs, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("world")
    data = write_tiny_data(root / "data")
    base = ["train", "--model", str(tiny_model_dirs["gpt2"]), "--data", str(data), *TINY, "--train.epochs", "1"]
    runs = {"lora": root / "lora", "prompt": root / "prompt"}
    for method, folder in runs.items():
        assert main([*base[:1], "--method", method, *base[1:], "--max-steps", "2", "--out", str(folder)]) == 0
    args = [*base[:1], "--method", "lora", *base[1:], "--train.checkpoint_every", "2"]
    real, calls = train_module.summary_loss, iter(range(1, 100))

    def interrupt_at_step_3(adapted, batch, *count):
        if next(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(adapted, batch, *count)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "summary_loss", interrupt_at_step_3)
        assert main([*args, "--out", str(root / "interrupted")]) == 130
    assert checkpoint.latest(root / "interrupted").name == "step-00000003"
    return World(root, tiny_model_dirs["gpt2"], tiny_model_dirs["llama"], data, runs["lora"], runs["prompt"],
                 root / "interrupted", args)


# ---------------------------------------------------------------- what each case damages

def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def yaml_case(text) -> Callable[[Path, World], None]:
    return lambda d, w: write(d / "c.yaml", text)


def data_case(name: str, content) -> Callable[[Path, World], None]:
    """A data folder `d/data` (the shared validation split) whose `name` holds `content`: bytes, text, or what a
    callable (path, world) makes of the path."""
    def setup(d: Path, w: World) -> None:
        (d / "data").mkdir()
        shutil.copy(w.data / "validation.jsonl", d / "data")
        if callable(content):
            content(d / "data" / name, w)
        else:
            write(d / "data" / name, content)
    return setup


def rows_with(**changes) -> Callable[[Path, World], None]:
    """The shared training rows with row 3 (line 3) changed: column -> value."""
    def make(path: Path, w: World) -> None:
        rows = [json.loads(line) for line in (w.data / "train.jsonl").read_text().splitlines()]
        rows[2].update(changes)
        write(path, "".join(json.dumps(r) + "\n" for r in rows))
    return make


def copy_run(which: str, damage: Callable[[Path], None] | None = None) -> Callable[[Path, World], None]:
    def setup(d: Path, w: World) -> None:
        shutil.copytree(getattr(w, which), d / "run")
        if damage:
            damage(d / "run")
    return setup


def newest_checkpoint(run: Path) -> Path:
    return checkpoint.latest(run)


def edit_state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = newest_checkpoint(run) / checkpoint.STATE
        state = json.loads(path.read_text())
        result = change(state)
        path.write_text(json.dumps(state if result is None else result))
    return damage


def drop_tensor(file: str, key: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        path = folder / file
        tensors = load_file(str(path))
        del tensors[key]
        save_file(tensors, str(path))
    return damage


def lora_key(folder: Path) -> str:
    return sorted(load_file(str(folder / "adapter_model.safetensors")))[0]


def unwritable(path: Path) -> bool:
    """Make folder `path` unwritable (immutable for root, read-only otherwise); False where that cannot be done."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode:
            return False
    else:
        path.chmod(0o555)
    try:
        (path / "probe").touch()
    except OSError:
        return True
    (path / "probe").unlink()
    return False


def writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], stderr=subprocess.DEVNULL)
    if path.exists():
        path.chmod(0o755)


# Simulated failures of the operating system, run in the peftsum process before the command.
FULL_DISK_AT_CHECKPOINT = '''
from safetensors import SafetensorError
import peftsum.training.checkpoint as c
def full(tensors, path, *args, **kwargs):
    open(path, "wb").write(b"half a checkpoint")
    raise SafetensorError('Error while serializing: I/O error: No space left on device (os error {number}) at path "' + path + '"')
c.save_file = full
'''
FULL_DISK = '''
import errno, os
def fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.fsync = fsync
'''
FULL_DISK_AFTER_GENERATING = '''
import errno, os
import peftsum.infra.files as f
def fsync(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
f.fsync = fsync
'''


@dataclass
class Case:
    id: str
    args: list[str]  # formatted with {d} (the case's folder), {gpt2}, {data}, {lora_run}, {prompt_run}...
    message: str  # found in the one line of stderr
    setup: Callable[[Path, World], None] | None = None
    code: int = 2
    prelude: str = ""
    stdin: bytes | None = None
    watch_output: bool = True  # False: the command may write its output folder; inputs are still watched
    needs: Callable[[Path], bool] | None = None  # run in the case folder; False skips the case


TRAIN = ["train", "--method", "lora", "--model", "{gpt2}", *TINY, "--train.epochs", "1"]
TRAIN_ON_DATA = [*TRAIN, "--data", "{data}"]
TRAIN_ON_MINE = [*TRAIN, "--data", "{d}/data"]
RESUME = ["{interrupted_args}", "--out", "{d}/run", "--resume"]
MISSING = "/nonexistent-peftsum"

CASES = [
    # ---------------- configs
    Case("yaml-not-utf8", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml is not UTF-8 text (byte 0xe9 at offset 24, line 3)", yaml_case(b"train:\n  epochs: 2\n# caf\xe9\n")),
    Case("yaml-duplicate-key", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: duplicate key 'epochs' at line 3", yaml_case("train:\n  epochs: 2\n  epochs: 3\n")),
    Case("yaml-duplicate-section", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: duplicate key 'train' at line 3", yaml_case("train:\n  epochs: 2\ntrain:\n  seed: 3\n")),
    Case("yaml-bool-for-int", ["compare", "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: train.epochs: expected int, got True (a boolean)", yaml_case("train:\n  epochs: true\n")),
    Case("yaml-float-for-int", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: lora.rank: expected int, got 2.5", yaml_case("lora:\n  rank: 2.5\n")),
    Case("yaml-number-for-text", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: data.hub_config: expected str, got 1.1 (a number); quote it", yaml_case("data:\n  hub_config: 1.10\n")),
    Case("yaml-bool-for-float", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: lora.lr: expected float, got True (a boolean)", yaml_case("lora:\n  lr: yes\n")),
    Case("yaml-list-for-int", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: train.seed: expected int, got [1, 2] (a list)", yaml_case("train:\n  seed: [1, 2]\n")),
    Case("yaml-empty-int", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: train.seed: expected int, got None (empty)", yaml_case("train:\n  seed:\n")),
    Case("yaml-scalar-for-section", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: train: expected a mapping of settings, got 3", yaml_case("train: 3\n")),
    Case("yaml-unknown-key", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml: unknown config key 'train.epoch'", yaml_case("train:\n  epoch: 2\n")),
    Case("yaml-not-a-mapping", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml must hold a mapping of sections", yaml_case("- train\n- lora\n")),
    Case("yaml-malformed", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml is not valid YAML: while parsing a flow sequence (line 2): expected ',' or ']'", yaml_case("train:\n  epochs: [1\n")),
    Case("yaml-python-object", [*TRAIN_ON_DATA, "--config", "{d}/c.yaml", "--out", "{d}/out"],
         "c.yaml is not valid YAML", yaml_case("train: !!python/object/apply:os.system ['true']\n")),
    Case("config-is-a-folder", [*TRAIN_ON_DATA, "--config", "{d}", "--out", "{d}/out"],
         "is a folder, not a config file"),
    Case("config-missing", [*TRAIN_ON_DATA, "--config", f"{MISSING}.yaml", "--out", "{d}/out"],
         f"config file not found: {MISSING}.yaml"),
    # ---------------- data files
    Case("data-object-in-document", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "train.jsonl: line 3, column 'document': expected text (a string or a list of strings), got a JSON object",
         data_case("train.jsonl", rows_with(document={"text": "buses"}))),
    Case("data-list-of-numbers-in-summary", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "train.jsonl: line 3, column 'summary': expected text (a string or a list of strings), got a list holding "
         "non-text items", data_case("train.jsonl", rows_with(summary=["buses", 3]))),
    Case("data-boolean-document", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "line 3, column 'document': expected text (a string or a list of strings), got a boolean",
         data_case("train.jsonl", rows_with(document=True))),
    Case("data-objects-in-references", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "line 3, column 'references': expected text",
         data_case("train.jsonl", rows_with(references=[{"text": "x"}]))),
    Case("data-train-is-a-fifo", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "data/train.jsonl is a named pipe (FIFO), not a data file", data_case("train.jsonl", lambda p, w: os.mkfifo(p))),
    Case("data-train-is-a-folder", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "data/train.jsonl is a folder, not a data file", data_case("train.jsonl", lambda p, w: p.mkdir())),
    Case("data-train-is-a-link-loop", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "data/train.jsonl is a symbolic link loop, not a data file",
         data_case("train.jsonl", lambda p, w: p.symlink_to(p.name))),
    Case("data-train-is-a-broken-link", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "data/train.jsonl is a broken symbolic link (to gone.jsonl), not a data file",
         data_case("train.jsonl", lambda p, w: p.symlink_to("gone.jsonl"))),
    Case("data-folder-is-a-link-loop", [*TRAIN, "--data", "{d}/loop", "--out", "{d}/out"],
         "data source '{d}/loop' is a symbolic link loop: it must be a folder",
         lambda d, w: (d / "loop").symlink_to("loop")),
    Case("data-source-is-a-file", [*TRAIN, "--data", "{data}/train.jsonl", "--out", "{d}/out"],
         "train.jsonl' is a file: it must be a folder holding train/validation files"),
    Case("data-malformed-jsonl", [*TRAIN_ON_MINE, "--out", "{d}/out"], "train.jsonl: line 2 is not valid JSON",
         data_case("train.jsonl", '{"document": "a", "summary": "b"}\n{"document": "a",\n')),
    Case("data-jsonl-line-not-an-object", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "train.jsonl: line 1 is not a JSON object", data_case("train.jsonl", '["a", "b"]\n')),
    Case("data-csv-not-utf8", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "train.csv is not UTF-8 text (byte 0xe9 at offset 20, line 2)",
         data_case("train.csv", b"document,summary\ncaf\xe9,x\n")),
    Case("data-csv-ragged-row", [*TRAIN_ON_MINE, "--out", "{d}/out"],
         "train.csv: line 3 has 3 fields but the header has 2",
         data_case("train.csv", "document,summary\na b c,a\nd e f,d,extra\n")),
    Case("data-train-empty", [*TRAIN_ON_MINE, "--out", "{d}/out"], "train.jsonl: no rows",
         data_case("train.jsonl", "\n\n")),
    Case("data-no-train-file", [*TRAIN_ON_MINE, "--out", "{d}/out"], "no 'train' file in",
         data_case("notes.txt", "hello")),
    # ---------------- adapters (a copy of the shared trained runs, damaged)
    Case("adapter-config-not-utf8", ["summarize", "--adapter", "{d}/run", "{data}/train.jsonl"],
         "run/adapter_config.json is not UTF-8 text",
         copy_run("lora_run", lambda r: write(r / "adapter_config.json", b'{"peft_type": "LORA", "x": "caf\xe9"}'))),
    Case("adapter-config-not-json", ["evaluate", "--adapter", "{d}/run"],
         "run/adapter_config.json is not valid JSON (Expecting value at line 1, column 1)",
         copy_run("lora_run", lambda r: write(r / "adapter_config.json", "peft_type = LORA\n"))),
    Case("adapter-config-a-list", ["export", "--adapter", "{d}/run", "--merged", "{d}/merged"],
         "run/adapter_config.json must hold a JSON object",
         copy_run("lora_run", lambda r: write(r / "adapter_config.json", '["LORA"]'))),
    Case("prompt-adapter-missing-tensor", ["summarize", "--run", "{d}/run", "{data}/train.jsonl"],
         "run/adapter_model.safetensors: no tensor prompt_embeddings",
         copy_run("prompt_run", drop_tensor("adapter_model.safetensors", "prompt_embeddings"))),
    Case("lora-adapter-missing-tensor", ["evaluate", "--run", "{d}/run", "--eval-size", "2"],
         "run/adapter_model.safetensors: no tensor base_model.model.",
         copy_run("lora_run", lambda r: drop_tensor("adapter_model.safetensors", lora_key(r))(r))),
    Case("adapter-weights-truncated", ["summarize", "--run", "{d}/run", "{data}/train.jsonl"],
         "run/adapter_model.safetensors is not a readable safetensors file",
         copy_run("lora_run", lambda r: write(r / "adapter_model.safetensors",
                                              (r / "adapter_model.safetensors").read_bytes()[:-40]))),
    Case("adapter-weights-a-folder", ["summarize", "--run", "{d}/run", "{data}/train.jsonl"],
         "run/adapter_model.safetensors is a folder, not a weights file",
         copy_run("lora_run", lambda r: ((r / "adapter_model.safetensors").unlink(),
                                         (r / "adapter_model.safetensors").mkdir()))),
    Case("adapter-pickled-only", ["summarize", "--run", "{d}/run", "{data}/train.jsonl"],
         "only pickled weights (adapter_model.bin)",
         copy_run("lora_run", lambda r: (r / "adapter_model.safetensors").rename(r / "adapter_model.bin"))),
    # ---------------- checkpoints (a copy of the shared interrupted run, damaged), resumed
    Case("checkpoint-state-missing-keys", RESUME, "step-00000003 has no 'settings': incomplete",
         copy_run("interrupted", edit_state(lambda s: s.pop("settings")))),
    Case("checkpoint-state-not-json", RESUME, "step-00000003/state.json is not valid JSON",
         copy_run("interrupted", lambda r: write(newest_checkpoint(r) / "state.json", '{"step": 3,'))),
    Case("checkpoint-state-a-list", RESUME, "step-00000003/state.json must hold a JSON object",
         copy_run("interrupted", edit_state(lambda s: [s]))),
    Case("checkpoint-tensors-truncated", RESUME, "step-00000003/tensors.safetensors is not a readable safetensors",
         copy_run("interrupted", lambda r: write(newest_checkpoint(r) / "tensors.safetensors", b"\x08\x00"))),
    Case("checkpoint-missing-rng-tensor", RESUME, "step-00000003 has no 'rng/torch'",
         copy_run("interrupted", lambda r: drop_tensor("tensors.safetensors", "rng/torch")(newest_checkpoint(r)))),
    Case("checkpoint-disk-full", [*TRAIN_ON_DATA, "--train.checkpoint_every", "2", "--out", "{d}/out"],
         "cannot write checkpoint {d}/out/checkpoints/step-00000002: No space left on device: free some space",
         prelude=FULL_DISK_AT_CHECKPOINT.replace("{number}", str(errno.ENOSPC)), watch_output=False),
    Case("checkpoint-not-writable", [*TRAIN_ON_DATA, "--train.checkpoint_every", "2", "--out", "{d}/out"],
         "step-00000002: Permission denied: the folder is not writable",
         prelude=FULL_DISK_AT_CHECKPOINT.replace("{number}", str(errno.EACCES)), watch_output=False),
    # ---------------- outputs
    Case("out-empty", [*TRAIN_ON_DATA, "--out", ""], "out must name a folder, got ''"),
    Case("out-is-a-file", [*TRAIN_ON_DATA, "--out", "{data}/train.jsonl"], "train.jsonl is a file, not a folder"),
    Case("out-under-a-file", [*TRAIN_ON_DATA, "--out", "{data}/train.jsonl/run"],
         "--out {data}/train.jsonl/run: {data}/train.jsonl is a file, not a folder"),
    Case("out-unwritable", [*TRAIN_ON_DATA, "--out", "{d}/locked/run"], "the folder is not writable",
         needs=lambda d: unwritable(d / "locked")),
    Case("out-disk-full", [*TRAIN_ON_DATA, "--out", "{d}/out"],
         "--out {d}/out: cannot write in {d}: No space left on device: free some space", prelude=FULL_DISK),
    Case("compare-out-unwritable", ["compare", "--model", "{gpt2}", "--data", "{data}", *TINY, "--out", "{d}/locked"],
         "--out {d}/locked: cannot write in {d}/locked", needs=lambda d: unwritable(d / "locked")),
    Case("sweep-out-under-a-file", ["sweep", "--model", "{gpt2}", "--data", "{data}", *TINY, "--eval-size", "2",
                                    "--methods", "lora", "--vary", "lora.rank=1,2", "--out", "{data}/train.jsonl/x"],
         "{data}/train.jsonl is a file, not a folder"),
    Case("evaluate-out-under-a-file", ["evaluate", "--run", "{lora_run}", "--out", "{data}/train.jsonl/x"],
         "{data}/train.jsonl is a file, not a folder"),
    Case("summarize-output-is-the-input", ["summarize", "--run", "{lora_run}", "--input", "{d}/docs.jsonl",
                                           "--output", "{d}/docs.jsonl"], "docs.jsonl is also an input",
         lambda d, w: shutil.copy(w.data / "validation.jsonl", d / "docs.jsonl")),
    Case("summarize-output-is-a-document", ["summarize", "--run", "{lora_run}", "{d}/doc.txt", "--output",
                                            "{d}/./doc.txt"], "doc.txt is also an input",
         lambda d, w: write(d / "doc.txt", "the council said")),
    Case("summarize-output-is-a-folder", ["summarize", "--run", "{lora_run}", "{d}/doc.txt", "--output", "{d}"],
         "is a folder; give a file name", lambda d, w: write(d / "doc.txt", "the council said")),
    Case("summarize-output-under-a-file", ["summarize", "--run", "{lora_run}", "{d}/doc.txt", "--output",
                                           "{d}/doc.txt/x.jsonl"], "{d}/doc.txt is a file, not a folder",
         lambda d, w: write(d / "doc.txt", "the council said")),
    Case("summarize-output-empty", ["summarize", "--run", "{lora_run}", "{d}/doc.txt", "--output", ""],
         "--output is empty", lambda d, w: write(d / "doc.txt", "the council said")),
    Case("summarize-output-disk-full", ["summarize", "--run", "{lora_run}", "--input", "{d}/docs.jsonl",
                                        "--output", "{d}/new/p.jsonl"],
         "p.jsonl: No space left on device: free some space on that device; the 3 summaries went to standard output",
         lambda d, w: write(d / "docs.jsonl", "".join(json.dumps({"id": i, "document": "the council said on monday"})
                                                      + "\n" for i in range(3))),
         prelude=FULL_DISK_AFTER_GENERATING, watch_output=False),
    Case("export-merged-empty", ["export", "--run", "{lora_run}", "--merged", ""], "--merged is empty"),
    Case("export-merged-is-a-file", ["export", "--run", "{lora_run}", "--merged", "{data}/train.jsonl"],
         "--merged {data}/train.jsonl exists and is not a folder"),
    Case("export-merged-unwritable", ["export", "--run", "{lora_run}", "--merged", "{d}/locked/model"],
         "--merged {d}/locked/model: cannot write in {d}/locked", needs=lambda d: unwritable(d / "locked")),
    # ---------------- flags and documents
    Case("flag-negative-exponent", [*TRAIN_ON_DATA, "--lora.lr", "-1e-3", "--out", "{d}/out"],
         "lora.lr must be > 0, got -0.001"),
    Case("flag-negative-exponent-upper", [*TRAIN_ON_DATA, "--prompt.lr", "-2E+1", "--out", "{d}/out"],
         "prompt.lr must be > 0, got -20.0"),
    Case("flag-negative-int", [*TRAIN_ON_DATA, "--epochs", "-3", "--out", "{d}/out"],
         "train.epochs must be >= 1, got -3"),
    Case("flag-bool-for-int", [*TRAIN_ON_DATA, "--epochs", "true", "--out", "{d}/out"],
         "train.epochs: expected int, got 'true'"),
    Case("flag-float-for-int", [*TRAIN_ON_DATA, "--lora.rank", "2.5", "--out", "{d}/out"],
         "lora.rank: expected int, got '2.5'"),
    Case("flag-unknown", [*TRAIN_ON_DATA, "--lora.rnak", "4", "--out", "{d}/out"],
         "unrecognized arguments: --lora.rnak 4"),
    Case("flag-missing-method", ["train", "--data", "{data}", "--out", "{d}/out"],
         "the following arguments are required: --method"),
    Case("flag-unknown-method", ["compare", "--methods", "lora,adapterx", "--out", "{d}/out"],
         "unknown method 'adapterx'"),
    Case("flag-precision", [*TRAIN_ON_DATA, "--precision", "fp16", "--out", "{d}/out"],
         "model.precision must be auto, bf16 or fp32, got 'fp16'"),
    Case("flag-device-cuda-absent", ["evaluate", "--run", "{lora_run}", "--device", "cuda"],
         "model.device is cuda, but this machine has no CUDA device", needs=lambda d: not torch.cuda.is_available()),
    Case("flag-device-malformed", [*TRAIN_ON_DATA, "--device", "cuda:x", "--out", "{d}/out"],
         "model.device must be auto, cpu, cuda, cuda:N or mps, got 'cuda:x'"),
    Case("score-negative-samples", ["score", "--predictions", "{d}/p.txt", "--references", "{d}/p.txt",
                                    "--samples", "-5"], "--samples must be >= 0 (0 = no interval), got -5",
         lambda d, w: write(d / "p.txt", "a\nb\n")),
    Case("score-predictions-a-folder", ["score", "--predictions", "{d}", "--references", "{d}"],
         "is a folder, not a file"),
    Case("summarize-document-not-utf8", ["summarize", "--run", "{lora_run}", "{d}/doc.txt"],
         "doc.txt is not UTF-8 text (byte 0xe9 at offset 3, line 1)", lambda d, w: write(d / "doc.txt", b"caf\xe9")),
    Case("summarize-stdin-not-utf8", ["summarize", "--run", "{lora_run}", "-"], "<stdin> is not UTF-8 text",
         stdin=b"caf\xe9 au lait"),
    Case("summarize-document-a-fifo", ["summarize", "--run", "{lora_run}", "{d}/doc.txt"],
         "doc.txt is a named pipe (FIFO), not a document", lambda d, w: os.mkfifo(d / "doc.txt")),
    Case("summarize-input-object-in-document", ["summarize", "--run", "{lora_run}", "--input", "{d}/docs.jsonl"],
         "docs.jsonl: line 2, column 'document': expected text (a string or a list of strings), got a JSON object",
         lambda d, w: write(d / "docs.jsonl", '{"document": "buses"}\n{"document": {"a": 1}}\n')),
]


@dataclass
class Outcome:
    skipped: str | None = None
    fields: dict | None = None
    code: int = 0
    stdout: str = ""
    stderr: str = ""
    before: dict | None = None  # the case's folder before and after
    after: dict | None = None


def run_case(case: Case, world: World, d: Path) -> Outcome:
    d.mkdir()
    try:
        if case.needs is not None and not case.needs(d):
            return Outcome(skipped=f"{case.id}: not possible on this machine")
        if case.setup is not None:
            case.setup(d, world)
        fields = {"d": d, "gpt2": world.gpt2, "data": world.data, "lora_run": world.lora_run,
                  "prompt_run": world.prompt_run}
        args = []
        for arg in case.args:
            args += world.train_args if arg == "{interrupted_args}" else [arg.format(**fields)]
        before = snapshot(d)
        result = peftsum(*args, cwd=d, prelude=case.prelude, stdin=case.stdin)
        return Outcome(None, fields, result.returncode, result.stdout.decode(), result.stderr.decode(), before,
                       snapshot(d))
    finally:
        writable_again(d / "locked")


@pytest.fixture(scope="session")
def outcomes(world, tmp_path_factory) -> tuple[dict[str, Outcome], bool]:
    """Every case run once, a few at a time (each in its own folder); and whether the shared world (models, data,
    trained runs, checkpoints) came out of all of them byte for byte as it went in."""
    root = tmp_path_factory.mktemp("cases")
    shared = snapshot(world.root, world.gpt2.parent)
    with ThreadPoolExecutor(max_workers=min(4, (os.cpu_count() or 2) + 1)) as pool:
        ran = pool.map(lambda case: run_case(case, world, root / case.id), CASES)
        results = {case.id: outcome for case, outcome in zip(CASES, ran)}
    return results, snapshot(world.root, world.gpt2.parent) == shared


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_in_one_line_and_nothing_changes(case: Case, outcomes):
    results, world_unchanged = outcomes
    outcome = results[case.id]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    lines = message_lines(outcome.stderr)
    assert outcome.code == case.code, outcome.stderr
    assert "Traceback" not in outcome.stderr
    assert len(lines) == 1, outcome.stderr
    assert case.message.format(**outcome.fields) in lines[0]
    assert world_unchanged  # the shared inputs and earlier results
    # The case's own inputs are untouched; its output folder holds nothing new unless the command may write it.
    assert outcome.before.items() <= outcome.after.items()
    if case.watch_output:
        assert outcome.after == outcome.before
    assert not [path for path in outcome.after if ".tmp" in Path(path).name]  # nothing half-written left behind
    if case.id == "summarize-output-disk-full":  # the computed summaries are not lost
        assert [json.loads(line)["id"] for line in outcome.stdout.splitlines()] == [0, 1, 2]


# ---------------------------------------------------------------- what used to be refused or garbled, and now works

def test_bom_csv_keeps_its_ids_and_columns_and_utf16_yaml_loads(tmp_path):
    from peftsum.config import DataConfig, load_config
    from peftsum.core.data import load_split

    folder = tmp_path / "bom"
    folder.mkdir()
    (folder / "train.csv").write_text("id,document,summary\nx-1,the buses,buses\nx-2,the fares,\"fares\"\n",
                                      encoding="utf-8-sig")
    examples, info = load_split(DataConfig(source=str(folder)), "train")
    assert [e.id for e in examples] == ["x-1", "x-2"] and info["document_column"] == "document"
    (folder / "train.csv").write_text("document,summary\nthe buses,buses\n", encoding="utf-8-sig")
    assert load_split(DataConfig(source=str(folder)), "train")[1]["document_column"] == "document"

    (folder / "train.jsonl").write_text('{"document": ["one.", "two."], "summary": "one"}\n', encoding="utf-8")
    (folder / "train.csv").unlink()
    assert load_split(DataConfig(source=str(folder)), "train")[0][0].document == "one. two."  # sentences joined

    (tmp_path / "c.yaml").write_text("train:\n  epochs: 3\nlora:\n  lr: 1e-3\n", encoding="utf-16")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.train.epochs == 3 and cfg.lora.lr == 1e-3  # YAML's "1e-3" is text, converted as a flag would be


def test_summarize_output_into_a_new_folder_is_created(world, tmp_path):
    out = tmp_path / "new" / "deeper" / "p.jsonl"
    result = peftsum("summarize", "--run", world.lora_run, "--input", world.data / "validation.jsonl", "--output",
                     out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert len(out.read_text().splitlines()) == 8


# ---------------------------------------------------------------- signals

def test_sigterm_from_outside_saves_a_checkpoint_and_the_run_resumes_to_the_same_weights(world, reference, tmp_path):
    args = [*world.train_args, "--train.epochs", "2"]

    cut = tmp_path / "cut"
    process = peftsum(*args, "--out", cut, cwd=tmp_path, prelude=SLOW_STEPS, popen=True)
    deadline = time.monotonic() + 120
    while checkpoint.latest(cut) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # as a scheduler preempting the job
    _, stderr = process.communicate(timeout=120)
    stderr = stderr.decode()
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    (line,) = message_lines(stderr)
    assert line.startswith("peftsum: interrupted by SIGTERM at step ") and "; checkpoint saved in " in line
    step = int(line.split(" at step ")[1].split(";")[0])
    assert 2 <= step < 12 and checkpoint.latest(cut).name == f"step-{step:08d}"
    assert not (cut / "adapter_model.safetensors").exists()
    assert not (cut / ".peftsum.infra.lock").exists()  # released on the way out

    resumed = peftsum(*shlex.split(line.split("resume with: peftsum ")[1]), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert max_diff(trained_weights(cut), trained_weights(reference)) < 1e-6
    assert step_losses(cut) == step_losses(reference)


def test_sighup_stops_training_as_ctrl_c_does(world, reference, tmp_path, monkeypatch, capsys):
    args = [*world.train_args, "--train.epochs", "2"]
    real, calls = train_module.summary_loss, iter(range(1, 100))

    def hang_up_at_forward_9(adapted, batch, *count):  # in epoch 2
        if next(calls) == 9:
            signal.raise_signal(signal.SIGHUP)  # a real SIGHUP, as from a closed terminal
        return real(adapted, batch, *count)

    monkeypatch.setattr(train_module, "summary_loss", hang_up_at_forward_9)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 129
    assert "interrupted by SIGHUP at step 9; checkpoint saved" in capsys.readouterr().err
    assert checkpoint.latest(tmp_path / "cut").name == "step-00000009"
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert max_diff(trained_weights(tmp_path / "cut"), trained_weights(reference)) < 1e-6
    assert step_losses(tmp_path / "cut") == step_losses(reference)


SECOND_SIGTERM_DURING_THE_CHECKPOINT_WRITE = SLOW_STEPS + '''
import os, signal
import peftsum.training.checkpoint as c
real_save = c.save_file
calls = iter(range(1, 100))
def forward(*args):
    if next(calls) == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: training finishes step 5 and writes its checkpoint...
    return slow(*args)
t.summary_loss = forward
def save_file(tensors, path, *args, **kwargs):
    if ".tmp-step-00000005" in path:
        open(path, "wb").write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGTERM)  # ... and the second (the grace period is over) lands mid-write
    return real_save(tensors, path, *args, **kwargs)
c.save_file = save_file
'''


def test_a_second_sigterm_during_a_checkpoint_write_keeps_the_last_complete_checkpoint(world, reference, tmp_path):
    args = [*world.train_args, "--train.epochs", "2"]
    cut = tmp_path / "cut"
    result = peftsum(*args, "--out", cut, cwd=tmp_path, prelude=SECOND_SIGTERM_DURING_THE_CHECKPOINT_WRITE)
    stderr = result.stderr.decode()
    assert result.returncode == 143, stderr
    assert "Traceback" not in stderr
    (line,) = message_lines(stderr)
    assert line.startswith("peftsum: interrupted by SIGTERM; resume with: ")
    assert [p.name for p in checkpoint.complete(cut)] == ["step-00000002", "step-00000004"]
    assert not list((cut / checkpoint.FOLDER).glob(".tmp-*"))  # the half-written one is gone
    tensors, state = checkpoint.load(checkpoint.latest(cut))
    assert state["step"] == 4

    resumed = peftsum(*args, "--out", cut, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert max_diff(trained_weights(cut), trained_weights(reference)) < 1e-6


SIGTERM_WHILE_GENERATING = '''
import os, signal
import peftsum.evaluation.evaluate as e
real = e.generate_batch
def generate_batch(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
e.generate_batch = generate_batch
'''


def test_sigterm_outside_training_interrupts_at_once_and_writes_nothing(world, tmp_path):
    out = tmp_path / "p.jsonl"
    write(tmp_path / "docs.jsonl", '{"document": "the council said"}\n')
    result = peftsum("summarize", "--run", world.lora_run, "--input", tmp_path / "docs.jsonl", "--output", out,
                     cwd=tmp_path, prelude=SIGTERM_WHILE_GENERATING)
    assert result.returncode == 143
    assert message_lines(result.stderr.decode()) == ["peftsum: interrupted by SIGTERM"]
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_an_ignored_sighup_stays_ignored(world, tmp_path):
    """`nohup peftsum ...`: SIGHUP is ignored before peftsum starts, and a closed terminal does not stop the run."""
    out = tmp_path / "run"
    process = peftsum(*world.train_args, "--out", out, cwd=tmp_path, prelude=SLOW_STEPS, popen=True,
                      preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while checkpoint.latest(out) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    assert (out / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- the run-folder lock

# Training waits at its first step until a gate file appears: the lock is surely held meanwhile.
GATED_STEPS = '''
import os, time
import peftsum.training.train as t
real = t.summary_loss
def gated(*args):
    deadline = time.monotonic() + 120
    while not os.path.exists("{gate}") and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(*args)
t.summary_loss = gated
'''


def test_a_second_process_on_the_same_folder_is_refused_naming_the_first(world, tmp_path):
    out, gate = tmp_path / "run", tmp_path / "gate"
    first = peftsum(*world.train_args, "--out", out, cwd=tmp_path, prelude=GATED_STEPS.replace("{gate}", str(gate)),
                    popen=True)
    deadline = time.monotonic() + 120
    while not (out / ".peftsum.infra.lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    second = peftsum(*world.train_args, "--out", out, cwd=tmp_path)
    stderr = second.stderr.decode()
    assert second.returncode == 2, stderr
    (line,) = message_lines(stderr)
    assert f"{out} is in use by process {first.pid} on {socket.gethostname()} (since " in line
    assert "wait for it to finish or choose another --out" in line
    gate.touch()
    _, first_err = first.communicate(timeout=180)
    assert first.returncode == 0, first_err.decode()  # the first run was not disturbed
    assert (out / "adapter_model.safetensors").is_file() and not (out / ".peftsum.infra.lock").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(world, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".peftsum.infra.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                   "since": "2026-01-01T00:00:00+00:00", "command": "peftsum train"}))
    result = peftsum(*world.train_args, "--max-steps", "1", "--out", out, cwd=tmp_path)
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert (f"peftsum: note: taking over the lock on {out} left by process {dead.pid} on {socket.gethostname()} "
            f"(since 2026-01-01T00:00:00+00:00: peftsum train), which is no longer running") in stderr
    assert (out / "adapter_model.safetensors").is_file() and not (out / ".peftsum.infra.lock").exists()


def test_the_lock_refuses_within_one_process_and_cleans_up_what_it_created(tmp_path):
    from peftsum.errors import UserError
    from peftsum.infra import lock

    folder = tmp_path / "a" / "b"
    with lock.holding(folder):
        holder = json.loads((folder / lock.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(UserError, match=f"is in use by process {os.getpid()} on "):
            lock.acquire(folder)
    assert not (tmp_path / "a").exists()  # nothing was written: the folders it made are gone again


def test_without_flock_the_lock_file_alone_decides(tmp_path, monkeypatch, capsys):
    """Some network file systems have no flock: a live holder on this host is refused, a dead one taken over."""
    from peftsum.errors import UserError
    from peftsum.infra import lock

    monkeypatch.setattr(lock, "_flock", lambda fd, path: None)
    folder = tmp_path / "run"
    folder.mkdir()
    alive = subprocess.Popen(["sleep", "30"])
    try:
        (folder / lock.LOCK).write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "since": "then"}))
        with pytest.raises(UserError, match=f"in use by process {alive.pid} .*this file system cannot lock files"):
            lock.acquire(folder)
    finally:
        alive.kill()
        alive.wait()
    lock.acquire(folder).release()  # the holder is gone now
    assert f"left by process {alive.pid}" in capsys.readouterr().err
    assert not (folder / lock.LOCK).exists()


def test_a_stop_signal_can_be_set_by_hand_and_restores_the_handlers():
    from peftsum.infra.signals import StopSignal, exit_code

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(KeyboardInterrupt) as raised:
        with StopSignal() as stop:
            assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
            assert not stop.is_set()
            stop.set(signal.SIGTERM)  # what a scheduler's signal (or a caller) does
            assert stop.is_set() and stop.signum == signal.SIGTERM
            raise KeyboardInterrupt  # as the loop's TrainingInterrupted leaves the block
    assert raised.value.signum == signal.SIGTERM and exit_code(raised.value) == 143
    assert {s: signal.getsignal(s) for s in before} == before

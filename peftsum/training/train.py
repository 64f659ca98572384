"""The training loop: AdamW over the method's parameter groups, warmup + decay, clipping, bf16 autocast.

Readable in one sitting on purpose: `train` is the loop, over a `TrainState` (all a checkpoint carries: step, epoch,
position in the epoch, the unfinished epoch's `Tally`, the loss log) and a `Budget`, in a `TrainEnv` (where it trains:
device, dtype, pad id, run folder, FSDP, progress bar); one optimizer step is `_step`, saving is `_save`, a validation
point is `_validate`. Per-step losses go to the run folder's `train_log.jsonl` (rewritten with each checkpoint, so it
always matches the newest one); the returned dict holds per-epoch wall time and throughput (real tokens only: padding
and virtual tokens do not count; time spent writing checkpoints or validating does not count either: the epoch's
`Stopwatch` is paused meanwhile).

Validation during training (`train.eval_every`): the caller passes a `validate` function (evaluate.validation) that
the loop calls every N steps and at the last step, with dropout off; the points join the state (so checkpoints carry
them and a resumed run has the same history), `validation_log.jsonl` and the returned dict. Early stopping and
keep_best follow from the points alone (`stopped_early`, `best_point`); the best point's weights are kept aside (and
checkpointed) so that keep_best can hand them back at the end. `on_step` is called with each log row (and the
validation point of that step, if any) once it is complete, also for the rows a resumed run restored: what a tracker
needs, without tracker code here.

Given a run folder (`TrainEnv.folder`), the loop checkpoints every `checkpoint_every` steps and at each epoch end, and
continues from the newest checkpoint found there; the resumed run ends with the same weights as an uninterrupted one.
A stop request (Ctrl-C, SIGTERM or SIGHUP: signals.py; or the `stop` event a caller passes) finishes the current
step, writes a checkpoint and raises `TrainingInterrupted`; a NaN or infinite loss stops the run before it can reach
the weights. The clock is an argument too (`clock`, which the `Stopwatch` reads), so that time budgets can be tested
without waiting.

Started as several processes (`torchrun`, `accelerate launch`: see distributed.py), the loop is data-parallel over
the same global batches: each rank runs its slice of every batch, the loss is normalised by the summary tokens of the
whole global batch and the gradients are summed across ranks, so a step equals the single-process step up to the
order of float additions. Every rank holds the same weights; rank 0 alone writes checkpoints and the log. Dropout
masks differ per rank (rank r seeds with seed + r; rank 0 draws what a single process draws). With FSDP
(`TrainEnv.fsdp`), the model is sharded over the ranks (torch FSDP2, full fine-tuning) and its loss comes from the
model's own forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..core.forward import autocast, collate, summary_loss, whole_model_loss
from ..core.prompts import IGNORE, Encoded
from ..errors import UserError
from ..fast import paused, should_compile, training_blocks
from ..infra import distributed, signals
from ..infra.files import write_jsonl
from ..infra.runs import TRAIN_LOG, VALIDATION_LOG
from ..methods.base import Adapted
from . import checkpoint

# What asks the loop to stop at the next step boundary: anything with is_set(), a StopSignal or a threading.Event.
StopRequest = signals.StopSignal | threading.Event

# Settings that change how often state is saved, not what is trained: a run may resume with other values.
# `compile` and `gradient_checkpointing` are among them: they change how fast (and the float rounding of fused
# kernels), not what is trained; `report_to` only where the numbers are also sent.
NOT_TRAINING = ("checkpoint_every", "keep_checkpoints", "compile", "gradient_checkpointing", "report_to")
# Validation settings decide where a run stops and which weights it keeps; they count only while validation is on, so
# that checkpoints written before validation existed still resume.
VALIDATION = ("eval_every", "eval_size", "eval_rouge", "early_stopping_patience", "keep_best")

# Reading a loss back makes the host wait for the device; on a GPU the losses (and gradient norms) are read every
# this many steps instead, and at every checkpoint, epoch end, validation point and stop, while the fused AdamW skips,
# on the device, the update of a step whose loss or gradient norm is not finite. On a CPU there is nothing to wait
# for: every step.
LOSS_READ_EVERY = {"cuda": 16}


class TrainingInterrupted(KeyboardInterrupt):
    """A stop request during training (Ctrl-C, SIGTERM, SIGHUP), raised once a checkpoint of the last finished step
    is on disk."""

    def __init__(self, step: int, saved: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved = step, saved


# ---------------------------------------------------------------- where a run trains, and its training time

@dataclass(frozen=True)
class TrainEnv:
    """Where a run trains, apart from what it trains: the device and autocast dtype, the tokenizer's pad id, the run
    folder (checkpoints, resume, `train_log.jsonl`; None: nothing is written), the whole run's config (which the
    checkpoints carry, and check on resume), whether the model is sharded with FSDP, and the progress bar."""

    device: torch.device
    dtype: torch.dtype
    pad_id: int
    folder: Path | None = None
    run_config: dict | None = None
    fsdp: bool = False
    progress: bool = True

    @property
    def log_path(self) -> Path | None:
        return self.folder / TRAIN_LOG if self.folder is not None else None


class Stopwatch:
    """Training time: seconds on `clock` since the watch started, plus `elapsed` carried over (a resumed epoch's), less
    the time spent in `paused()` blocks (validating, saving). Each reading reads the clock once."""

    def __init__(self, clock: Callable[[], float], elapsed: float = 0.0):
        self.clock = clock
        self.started = clock() - elapsed

    def elapsed(self) -> float:
        return self.clock() - self.started

    @contextlib.contextmanager
    def paused(self):
        """A block whose time does not count; yields the training time at the pause."""
        pause = self.clock()
        try:
            yield pause - self.started
        finally:
            self.started += self.clock() - pause


# ---------------------------------------------------------------- memory

def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory on a GPU, else the process's peak resident memory since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ---------------------------------------------------------------- schedule, batches and budgets

def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: int = 32) -> list[list[int]]:
    """Seeded, length-grouped batches of example indices; the same lengths, seed and epoch give the same batches.

    The shuffled examples are taken `group` batches at a time and sorted by length within the group, so each batch
    holds examples of similar length and pads little; the batch order is then shuffled again, so lengths do not
    drift across the epoch. Resuming relies on determinism: a checkpoint records only (epoch, position in this list).
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = group * batch_size
    order = [i for start in range(0, len(order), window)
             for i in sorted(order[start:start + window], key=lambda i: lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def plan_steps(n: int, cfg: TrainConfig) -> int | None:
    """Optimizer steps the run will take; None under a budget with no step cap (it ends when the budget does)."""
    if Budget.of(cfg) is not None:
        return cfg.max_steps or None
    per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def planned_tokens(lengths: list[int], cfg: TrainConfig, total_steps: int | None) -> int | None:
    """Real tokens the run will train on (None under a time budget: it ends when the time does)."""
    if cfg.budget_tokens:
        return cfg.budget_tokens
    if total_steps is None:
        return None
    per_epoch = math.ceil(math.ceil(len(lengths) / cfg.batch_size) / cfg.grad_accum)
    return round(sum(lengths) * total_steps / max(per_epoch, 1))


def budget_factor(schedule: str, warmup_ratio: float, progress: float, per_step: float) -> float:
    """The learning-rate factor at `progress` (share of the budget spent) when the number of steps is not known.

    Warmup and decay are shares of the budget, as warmup_ratio and the decay are shares of the steps otherwise.
    `per_step` (the mean share one step spends so far) makes warmup end on the step that reaches warmup_ratio.
    """
    if progress < warmup_ratio:
        return (progress + per_step) / (warmup_ratio + per_step)
    rest = min(1.0, (progress - warmup_ratio) / max(1e-12, 1.0 - warmup_ratio))
    if schedule == "linear":
        return max(0.0, 1.0 - rest)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * rest))
    return 1.0


@dataclass
class Budget:
    """An equal-budget limit: train until `limit` seconds of training wall-clock, or real tokens, are spent."""

    kind: str  # "seconds" | "tokens"
    limit: float

    @classmethod
    def of(cls, cfg: TrainConfig) -> Budget | None:
        """The run's budget, or None for an epoch-bound run."""
        if cfg.budget_seconds:
            return cls("seconds", cfg.budget_seconds)
        if cfg.budget_tokens:
            return cls("tokens", cfg.budget_tokens)
        return None

    def share(self, epochs: list[dict], elapsed: float, tokens: int) -> float:
        """The share spent: the finished epochs plus the current one's `elapsed` seconds or `tokens`."""
        done = sum(e[self.kind] for e in epochs) + (elapsed if self.kind == "seconds" else tokens)
        if self.kind == "seconds" and distributed.world() > 1:  # clocks differ: all follow rank 0's, to stop together
            done = distributed.broadcast_object(done)
        return done / self.limit

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- the state a checkpoint carries

@dataclass
class Tally:
    """The unfinished epoch so far: its training seconds, real tokens, summed step losses and steps."""

    seconds: float = 0.0
    tokens: int = 0
    loss: float = 0.0
    steps: int = 0

    @classmethod
    def of(cls, saved: dict) -> Tally:
        """The tally a checkpoint saved as a dict (a missing field is damage: KeyError, as for any missing key)."""
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls)})

    def epoch_row(self, epoch: int, seconds: float, batches: int, of_batches: int) -> dict:
        """The finished epoch's entry of the returned dict (and of checkpoints), over its `seconds` of training."""
        return {"epoch": epoch, "seconds": seconds, "tokens": self.tokens, "tokens_per_s": self.tokens / seconds,
                "mean_loss": self.loss / self.steps, "batches": batches, "of_batches": of_batches}


@dataclass
class TrainState:
    """A run's progress: the log rows hold the loss curve, `tally` the unfinished epoch, `epochs` the finished ones,
    `validation` the validation points; `progress` is the share of the budget spent (what the schedule follows under a
    budget, with `per_step`, the mean share a step spends) and is recomputed on resume, not saved."""

    step: int = 0
    epoch: int = 1
    position: int = 0  # batches of the current epoch already trained
    tally: Tally = field(default_factory=Tally)
    log: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    progress: float = 0.0
    per_step: float = 0.0

    SAVED = ("step", "epoch", "position", "tally", "log", "epochs", "validation")

    def saved(self) -> dict:
        """The progress a checkpoint's state.json holds (the tally as a dict of its fields)."""
        return {key: dataclasses.asdict(self.tally) if key == "tally" else getattr(self, key) for key in self.SAVED}

    def load(self, saved: dict) -> None:
        """Take the progress of a checkpoint's state, in place."""
        for key in self.SAVED:
            # Checkpoints written before validation existed have no "validation"; any other missing key is damage.
            value = saved.get(key, []) if key == "validation" else saved[key]
            setattr(self, key, Tally.of(value) if key == "tally" else value)


def best_point(points: list[dict]) -> dict | None:
    """The validation point of lowest loss (the earliest of equals), or None before the first."""
    return min(points, key=lambda p: p["loss"], default=None)


def stopped_early(points: list[dict], patience: int) -> bool:
    """Whether the last `patience` validation points all failed to improve on the best before them (0: never)."""
    best = best_point(points)
    return bool(patience) and best is not None and len(points) - 1 - points.index(best) >= patience


def data_digest(examples: list[Encoded]) -> str:
    """Fingerprint of the tokenized training set: a resumed run must see the very same examples."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()


def _training_settings(cfg: TrainConfig, run_config: dict | None, method: str) -> dict:
    """The settings that decide the trained weights (the training data itself is checked through its digest); with
    validation on, also the data settings, which choose the validation examples."""
    ignored = NOT_TRAINING + (() if cfg.eval_every else VALIDATION)
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    if run_config is None:
        return {"train": train}
    data = {"data": run_config["data"]} if cfg.eval_every else {}
    return {"model": run_config["model"], "train": train, method: run_config.get(method), **data}


# ---------------------------------------------------------------- what stays fixed during a run

@dataclass(frozen=True)
class _TrainingSet:
    """The encoded training examples, with what the loop reads of each: the summary tokens `summary_loss` counts (in
    whatever batch or rank it lands) and the real tokens; and their digest, which a resumed run must match."""

    examples: list[Encoded]
    targets: list[int]
    lengths: list[int]
    digest: str

    @classmethod
    def of(cls, examples: list[Encoded]) -> _TrainingSet:
        return cls(examples, [sum(label != IGNORE for label in e.labels[1:]) for e in examples],
                   [len(e.input_ids) for e in examples], data_digest(examples))


@dataclass
class _Run:
    """What a run's steps share: the model, data, optimizer and schedule, where it trains and what its checkpoints must
    match (fixed for the run), and the last checkpoint written and the stop all processes agreed on (which follow
    it)."""

    adapted: Adapted
    data: _TrainingSet
    cfg: TrainConfig
    env: TrainEnv
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    budget: Budget | None
    total_steps: int | None
    clock: Callable[[], float]
    settings: dict  # what a checkpoint must have been written with to be resumed (`_training_settings`)
    compiled: bool  # trained through compiled blocks (fast/compiled.py)
    read_every: int = 1  # steps between reads of the losses (LOSS_READ_EVERY)
    validate: Callable[[Adapted], dict] | None = None
    on_step: Callable[[dict, dict | None], None] | None = None
    last_saved: Path | None = None
    stop_agreed: bool = False  # several processes: the stop request all of them saw at the last step
    unread: list[_Pending] = field(default_factory=list)  # steps whose loss is still on the device
    last_loss: float = float("nan")  # the newest loss read, for the progress bar
    best: dict[str, torch.Tensor] | None = None  # keep_best: the weights of the best validation point

    @property
    def params(self) -> dict[str, torch.nn.Parameter]:
        return self.adapted.named_trainable()

    def out_of_steps(self, state: TrainState) -> bool:
        if self.cfg.max_steps and state.step >= self.cfg.max_steps:
            return True
        if stopped_early(state.validation, self.cfg.early_stopping_patience):
            return True
        return self.budget is not None and state.progress >= 1.0

    def stop_requested(self, stop: StopRequest, now: bool = False) -> bool:
        """Whether to stop; with several processes, all stop at the same step: the one they agree on."""
        if distributed.world() == 1:
            return stop.is_set()
        if now:
            flag = torch.tensor([float(stop.is_set())], device=self.env.device)
            self.stop_agreed = bool(distributed.all_reduce_sum(flag).item())
        return self.stop_agreed


@dataclass
class _Pending:
    """One step's loss, as the summed losses of its batches (still on the device until read), and the gradient
    norm when clipping; `row` is the step's log row, whose loss the read fills in."""

    losses: list[torch.Tensor]
    targets: int  # the step's summary tokens: the loss is the sum of losses[i] / targets
    norm: torch.Tensor | None
    step: int
    epoch: int
    host_loss: float | None = None  # the loss summed over the processes (several processes)
    value: float | None = None  # the loss, once read
    row: dict | None = None

    def read(self) -> tuple[float, float]:
        """(loss, gradient norm or 0.0), read from the device in one transfer."""
        tensors = ([] if self.host_loss is not None else self.losses) + ([self.norm] if self.norm is not None else [])
        values = torch.stack([t.float() for t in tensors]).tolist() if tensors else []
        loss = self.host_loss
        if loss is None:
            loss = 0.0
            for value in values[:len(self.losses)]:
                loss += value / self.targets
        return loss, values[-1] if self.norm is not None else 0.0

    def not_finite(self) -> torch.Tensor:
        """1.0 on the device where the loss or the gradient norm is not finite (AdamW's found_inf)."""
        bad = ~torch.isfinite(torch.stack([t.float() for t in self.losses]).sum())
        if self.norm is not None:
            bad = bad | ~torch.isfinite(self.norm)
        return bad.float()


def _read_every(device: torch.device, cfg: TrainConfig) -> int:
    # Several processes agree on the loss every step anyway; a time budget needs the device's time, not the host's.
    if distributed.world() > 1 or cfg.budget_seconds:
        return 1
    return LOSS_READ_EVERY.get(device.type, 1)


def fused_update(device: torch.device, dtype: torch.dtype, compiled: bool) -> bool:
    """Whether AdamW runs fused: everywhere but on the fp32 eager path, the reference that the golden values pin
    (every other path rounds differently anyway: bf16, fused kernels)."""
    return device.type in ("cpu", "cuda") and (compiled or dtype != torch.float32 or device.type == "cuda")


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], lr: float, weight_decay: float, *, fused: bool):
    """AdamW over the method's parameter groups; fused: one kernel over all tensors (on a CPU, a 28M-parameter LM
    head's update took 0.08 s instead of 0.85 s foreach), which also takes `found_inf` to skip an update on the
    device. Not fused, the update rounds as eager PyTorch does, which the golden values of the fp32 reference path
    pin."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))


def _schedule(cfg: TrainConfig, total_steps: int | None, state: TrainState):
    """The learning-rate factor per step: over the planned steps, or under a budget over the share of it spent."""
    if Budget.of(cfg) is None:
        return lr_lambda(cfg.schedule, int(cfg.warmup_ratio * total_steps), total_steps)
    return lambda _step: budget_factor(cfg.schedule, cfg.warmup_ratio, state.progress, state.per_step)


# ---------------------------------------------------------------- the loop

def train(adapted: Adapted, examples: list[Encoded], cfg: TrainConfig, lr: float, env: TrainEnv, *,
          clock: Callable[[], float] = time.perf_counter, stop: StopRequest | None = None,
          validate: Callable[[Adapted], dict] | None = None,
          on_step: Callable[[dict, dict | None], None] | None = None) -> dict:
    """Train `adapted.trainable` on `examples` at learning rate `lr`, in `env`; returns timing, throughput, memory and
    the loss curve.

    With `env.folder`, checkpoints go to its `checkpoints/` and training continues from the newest one there. With
    `env.fsdp`, `adapted.model` is already sharded (`distributed.fully_shard_model`) and `adapted.trainable` holds its
    sharded parameters. `stop` is an event that asks the loop to stop after the current step (default: a
    `signals.StopSignal`, which the first Ctrl-C, SIGTERM or SIGHUP sets); `clock` gives the wall-clock seconds that
    each epoch's `Stopwatch` reads. `validate` scores the model for a validation point (needed when cfg.eval_every is
    set; a collective with several processes); `on_step(row, point)` is called with each finished log row and that
    step's validation point (or None).
    """
    if cfg.eval_every and validate is None:
        raise ValueError("train.eval_every is set but no validate function was given")
    torch.manual_seed(cfg.seed + distributed.rank())  # dropout masks
    state = TrainState()  # filled in place from a checkpoint when resuming: the schedule reads it
    run = _prepare(adapted, _TrainingSet.of(examples), cfg, lr, env, state, clock=clock, validate=validate,
                   on_step=on_step)
    _resume(run, state)
    resumed_step = state.step if run.last_saved is not None else None
    if on_step is not None:  # a resumed run's listeners see the restored history first, so they hold all of it
        points = {p["step"]: p for p in state.validation}
        for row in state.log:
            on_step(row, points.get(row["step"]))
    reset_peak_memory(env.device)
    adapted.model.train()
    try:
        _epochs(run, state, stop)
    finally:
        adapted.model.eval()
    if cfg.keep_best and run.best is not None:
        with torch.no_grad():
            for name, p in run.params.items():
                p.copy_(run.best[name])
    _write_logs(run, state)
    return {**_summary(run, state, resumed_step), "compiled": run.compiled}


def _prepare(adapted: Adapted, data: _TrainingSet, cfg: TrainConfig, lr: float, env: TrainEnv, state: TrainState, *,
             clock: Callable[[], float], validate: Callable[[Adapted], dict] | None,
             on_step: Callable[[dict, dict | None], None] | None) -> _Run:
    """The run's fixed parts: its plan, optimizer and schedule (which follows `state` under a budget), and how the
    loop runs in `env` (compiled blocks, a fused update, how often the losses are read)."""
    total_steps = plan_steps(len(data.examples), cfg)
    compiled = not env.fsdp and should_compile(cfg.compile, env.device, planned_tokens(data.lengths, cfg, total_steps),
                                               cfg.budget_seconds, env.dtype)
    read_every = 1 if env.fsdp else _read_every(env.device, cfg)
    fused = not env.fsdp and (read_every > 1 or fused_update(env.device, env.dtype, compiled))
    optimizer = make_optimizer(adapted.method.param_groups(adapted, lr), lr, cfg.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, total_steps, state))
    return _Run(adapted, data, cfg, env, optimizer, scheduler, Budget.of(cfg), total_steps, clock,
                settings=_training_settings(cfg, env.run_config, adapted.name), compiled=compiled,
                read_every=read_every, validate=validate, on_step=on_step)


def _epochs(run: _Run, state: TrainState, stop: StopRequest | None) -> None:
    """Train epoch after epoch, behind a progress bar, until the epochs, steps or budget are spent; a stop request
    raises TrainingInterrupted once the last finished step is saved."""
    bar = tqdm(total=run.total_steps, initial=state.step, desc=f"train {run.adapted.name}",
               disable=not run.env.progress or not distributed.is_main(), dynamic_ncols=True)
    stop_context = contextlib.nullcontext(stop) if stop is not None else signals.StopSignal()
    model, cfg = run.adapted.model, run.cfg
    try:
        with stop_context as stop, training_blocks(model, run.env.device, max(run.data.lengths, default=0),
                                                   compile=run.compiled,
                                                   gradient_checkpointing=cfg.gradient_checkpointing,
                                                   cached_prefix=run.adapted.method.cached_prefix):
            # Under a budget, epochs go on until the budget is spent, the last one usually partial.
            while run.budget is not None or state.epoch <= cfg.epochs:
                if not _epoch(run, state, stop, bar):
                    break
            if run.stop_requested(stop, now=True):  # a stop during the last step: all is saved, but it was asked for
                raise TrainingInterrupted(state.step, run.last_saved)
    finally:
        bar.close()


def _epoch(run: _Run, state: TrainState, stop: StopRequest, bar) -> bool:
    """Train the rest of the current epoch (or until the steps or budget run out); False when nothing was left."""
    cfg, tally = run.cfg, state.tally
    batches = epoch_batches(run.data.lengths, cfg.batch_size, cfg.seed, state.epoch)
    watch = Stopwatch(run.clock, tally.seconds)  # a resumed epoch goes on from its training time so far
    if run.budget is not None:
        state.progress = run.budget.share(state.epochs, tally.seconds, tally.tokens)
    if run.out_of_steps(state):
        return False
    while state.position < len(batches) and not run.out_of_steps(state):
        if run.stop_requested(stop):
            _read(run, state)
            tally.seconds = watch.elapsed()
            raise TrainingInterrupted(state.step, _save(run, state))
        group = batches[state.position:state.position + cfg.grad_accum]
        pending, tokens = _step(run, state, group, stop)
        if run.budget is not None:  # the next step's learning rate follows the share spent so far
            state.progress = run.budget.share(state.epochs, watch.elapsed(), tally.tokens + tokens)
            state.per_step = state.progress / (state.step + 1)
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        state.step, state.position = state.step + 1, state.position + len(group)
        tally.steps, tally.tokens = tally.steps + 1, tally.tokens + tokens
        elapsed = watch.elapsed()
        pending.row = {"step": state.step, "epoch": state.epoch, "loss": None, "lr": run.scheduler.get_last_lr()[0],
                       "tokens_per_s": tally.tokens / max(elapsed, 1e-9)}
        state.log.append(pending.row)
        run.unread.append(pending)
        point = None
        if _validation_due(run, state, len(batches)):
            with watch.paused():  # validating is not training time
                point = _validate(run, state)
        if point is not None or len(run.unread) >= run.read_every:
            _read(run, state, point)
        _show(bar, run, state, elapsed)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.position < len(batches):
            _read(run, state)
            with watch.paused() as trained:  # saving is not training time
                tally.seconds = trained
                _save(run, state)
    _read(run, state)
    seconds = watch.elapsed()
    if tally.steps:
        state.epochs.append(tally.epoch_row(state.epoch, seconds, state.position, len(batches)))
    state.epoch, state.position, state.tally = state.epoch + 1, 0, Tally()
    _save(run, state)
    return True


def _step(run: _Run, state: TrainState, group: list[list[int]], stop: StopRequest) -> tuple[_Pending, int]:
    """Forward and backward over an accumulation group of global batches, then the optimizer update; returns the
    step's loss (mean over the group's summary tokens; read now, or later on a GPU) and its real tokens, both over
    every process."""
    adapted, data, env, world = run.adapted, run.data, run.env, distributed.world()
    loss_of = whole_model_loss if env.fsdp else summary_loss
    # Normalise by the summary tokens of the whole accumulation group: every token weighs the same.
    group_targets = sum(data.targets[i] for batch in group for i in batch)
    losses, step_tokens = [], 0
    for global_batch in group:
        mine = [global_batch[i] for i in distributed.shard(global_batch)]  # all of it in one process
        idle = not mine  # a batch with fewer examples than there are processes
        if idle and not env.fsdp:
            continue
        examples = [data.examples[i] for i in mine or global_batch[:1]]
        batch = {k: v.to(env.device) for k, v in collate(examples, env.pad_id).items()}
        # Known from the examples (the first label is a prompt token's): the device need not count them.
        count = sum(data.targets[i] for i in mine) if all(e.labels[:1] == [IGNORE] for e in examples) else None
        with autocast(env.device, env.dtype):
            loss_sum, _ = loss_of(adapted, batch, None if idle else count)
        if idle:  # FSDP needs every rank in every forward and backward: a stand-in adding nothing
            loss_sum = loss_sum * 0.0
        (loss_sum / group_targets).backward()
        losses.append(loss_sum.detach())
        step_tokens += 0 if idle else sum(data.lengths[i] for i in mine)
    pending = _Pending(losses, group_targets, None, state.step + 1, state.epoch)
    if world > 1:
        step_loss, _ = pending.read()
        totals = torch.tensor([step_loss, step_tokens, stop.is_set()], dtype=torch.float64, device=env.device)
        distributed.all_reduce_sum(totals)
        pending.host_loss, step_tokens, run.stop_agreed = totals[0].item(), int(totals[1]), bool(totals[2])
        if not env.fsdp:  # FSDP reduces its gradients itself
            distributed.all_reduce_grads(adapted.trainable)
    if run.cfg.max_grad_norm > 0:
        pending.norm = distributed.full_tensor(torch.nn.utils.clip_grad_norm_(adapted.trainable,
                                                                              run.cfg.max_grad_norm))
    if run.read_every == 1:  # read now: a non-finite loss or norm never reaches the weights
        pending.value = _checked(run, pending)
    else:  # the update of a non-finite step is skipped on the device; the read stops the run
        run.optimizer.found_inf = pending.not_finite()
    run.optimizer.step()
    return pending, step_tokens


def _checked(run: _Run, pending: _Pending) -> float:
    """The step's loss, read; a non-finite loss or gradient norm stops the run."""
    loss, norm = pending.read()
    if not math.isfinite(loss):
        _stop_non_finite(run, f"the loss ({loss})", pending.step, pending.epoch)
    if not math.isfinite(norm):
        _stop_non_finite(run, f"the gradient norm ({norm})", pending.step, pending.epoch)
    return loss


def _read(run: _Run, state: TrainState, point: dict | None = None) -> None:
    """Read the losses of the steps not read yet into their log rows and the epoch's tally (in step order), and hand
    each row to `on_step`, the newest with its validation `point`."""
    for pending in run.unread:
        if pending.value is None:
            pending.value = _checked(run, pending)
        pending.row["loss"] = pending.value
        state.tally.loss += pending.value
        run.last_loss = pending.value
        if run.on_step is not None:
            run.on_step(pending.row, point if pending is run.unread[-1] else None)
    run.unread.clear()


def _show(bar, run: _Run, state: TrainState, elapsed: float) -> None:
    budget = {"budget": f"{min(1.0, state.progress):.0%}"} if run.budget else {}
    point = {"val": f"{state.validation[-1]['loss']:.3f}"} if state.validation else {}
    bar.set_postfix(epoch=state.epoch, loss=f"{run.last_loss:.3f}",
                    tok_s=f"{state.tally.tokens / max(elapsed, 1e-9):.0f}", **point, **budget)
    bar.update()


# ---------------------------------------------------------------- validation points

def _validation_due(run: _Run, state: TrainState, batches: int) -> bool:
    """Every eval_every steps, and at the last step (so that the curve and keep_best see the final weights)."""
    if not run.cfg.eval_every:
        return False
    last_epoch = run.budget is None and state.epoch >= run.cfg.epochs and state.position >= batches
    return state.step % run.cfg.eval_every == 0 or last_epoch or run.out_of_steps(state)


def _validate(run: _Run, state: TrainState) -> dict:
    """Score the current weights (dropout off, compiled blocks paused), record the point, and keep the weights aside
    when they are the best so far and keep_best asks for them. Every rank records rank 0's numbers."""
    adapted = run.adapted
    adapted.model.eval()
    with paused(adapted.model):
        scores = run.validate(adapted)
    adapted.model.train()
    point = distributed.broadcast_object({"step": state.step, "epoch": state.epoch, **scores})
    state.validation.append(point)
    if run.cfg.keep_best and best_point(state.validation) is point:
        run.best = {name: p.detach().clone() for name, p in run.params.items()}
    return point


def _summary(run: _Run, state: TrainState, resumed_step: int | None) -> dict:
    seconds = sum(e["seconds"] for e in state.epochs)
    tokens = sum(e["tokens"] for e in state.epochs)
    result = {"epochs": state.epochs, "steps": state.step, "seconds": seconds, "tokens": tokens,
              "budget": run.budget.as_dict() if run.budget else None,
              "epochs_completed": sum(e.get("batches", 1) / e.get("of_batches", 1) for e in state.epochs),
              "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(run.env.device),
              "loss_curve": [[r["step"], r["loss"]] for r in state.log], "resumed_from_step": resumed_step}
    if run.cfg.eval_every:
        best = best_point(state.validation)
        kept = run.cfg.keep_best and best is not None
        result.update(validation=state.validation, best_step=best and best["step"],
                      stopped_early=stopped_early(state.validation, run.cfg.early_stopping_patience),
                      weights_step=best["step"] if kept else state.step)
    if distributed.world() > 1:  # tokens count every process's; time and memory are rank 0's
        result["processes"] = distributed.world()
    return result


# ---------------------------------------------------------------- saving and resuming

def _save(run: _Run, state: TrainState) -> Path | None:
    """Write a checkpoint of `state` (rank 0; with several processes every rank calls this together)."""
    if run.env.folder is None or state.step == 0:
        return run.last_saved
    if run.last_saved is not None and run.last_saved.name == checkpoint.step_name(state.step):
        return run.last_saved
    params = run.params
    finite = all(bool(torch.isfinite(distributed.local_part(p)).all()) for p in params.values())
    if run.env.fsdp:  # each rank saw only its shard
        finite = not distributed.all_reduce_sum(torch.tensor([float(not finite)], device=run.env.device)).item()
    if not finite:
        _stop_non_finite(run, "the weights", state.step, state.epoch)
    meta = {**state.saved(), "total_steps": run.total_steps, "method": run.adapted.name, "settings": run.settings,
            "data_digest": run.data.digest, "scheduler": run.scheduler.state_dict(), "config": run.env.run_config}
    run.last_saved = checkpoint.save_training(run.env.folder, state.step, params, run.optimizer, meta,
                                              run.cfg.keep_checkpoints, run.env.device, extra=run.best)
    _write_logs(run, state)  # the logs on disk always match the newest checkpoint
    return run.last_saved


def _write_logs(run: _Run, state: TrainState) -> None:
    if run.env.log_path and distributed.is_main():
        write_jsonl(run.env.log_path, state.log)
        if run.cfg.eval_every:
            write_jsonl(run.env.log_path.with_name(VALIDATION_LOG), state.validation)


def _resume(run: _Run, state: TrainState) -> None:
    """Continue from the newest checkpoint in the run folder, if there is one: weights, optimizer, schedule and RNGs
    restored from it, its progress loaded into `state`."""
    found = checkpoint.latest(run.env.folder) if run.env.folder is not None else None
    if distributed.world() > 1 and len(set(distributed.gather_objects([found and found.name]))) > 1:
        raise UserError(f"the processes see different checkpoints in {run.env.folder}: with several machines, the "
                        f"output folder must be on a file system they all share")
    if found is not None:
        with checkpoint.reading(found):  # a state.json missing its keys: one line naming it
            saved, extra = checkpoint.restore_training(found, run.params, run.optimizer, run.settings,
                                                       run.data.digest, run.env.device, run.cfg.seed)
            run.scheduler.load_state_dict(saved["scheduler"])
            state.load(saved)
        run.best = extra or None
        run.last_saved = found
        print(f"resuming {run.adapted.name} from {found} (step {state.step}"
              f"{f' of {run.total_steps}' if run.total_steps else ''})")
    if not run.env.fsdp:
        distributed.broadcast_params(run.adapted.trainable)  # replicas start identical (a no-op in one process)


def _stop_non_finite(run: _Run, what: str, step: int, epoch: int) -> None:
    kept = f"the last good checkpoint is {run.last_saved}" if run.last_saved else "no checkpoint was written"
    fp32 = " or --precision fp32" if run.env.dtype != torch.float32 else ""
    raise UserError(f"training stopped: {what} is not finite at step {step} (epoch {epoch}); {kept}; "
                    f"try a lower learning rate (--{run.adapted.name}.lr){fp32}, with --overwrite to start over")

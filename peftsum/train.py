"""The training loop: AdamW over the method's trainable parameters, warmup + decay, clipping, bf16 autocast.

Readable in one sitting on purpose. Per-step losses go to `train_log.jsonl` (rewritten with each checkpoint, so it
always matches the newest one); the returned dict holds per-epoch wall time and throughput (real tokens only: padding
and virtual tokens do not count; time spent writing checkpoints does not count either).

Given a run folder, the loop checkpoints every `checkpoint_every` steps and at each epoch end, and continues from the
newest checkpoint found there; the resumed run ends with the same weights as an uninterrupted one. Ctrl-C finishes
the current step, writes a checkpoint and raises `TrainingInterrupted`; a NaN or infinite loss stops the run before
it can reach the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import TrainConfig
from .data import Encoded
from .errors import UserError
from .files import write_jsonl
from .forward import autocast, collate, summary_loss
from .methods import Adapted

# Settings that change how often state is saved, not what is trained: a run may resume with other values.
NOT_TRAINING = ("checkpoint_every", "keep_checkpoints")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised once a checkpoint of the last finished step is on disk."""

    def __init__(self, step: int, saved: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.saved = step, saved


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


# ---------------------------------------------------------------- schedule and batches

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


def plan_steps(n: int, cfg: TrainConfig) -> int:
    per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


# ---------------------------------------------------------------- what a checkpoint holds

def named_trainable(adapted: Adapted) -> dict[str, torch.nn.Parameter]:
    """The trainable tensors by a stable name: the model's parameter name, or `soft_prompt.embeddings`."""
    names = {id(p): n for n, p in adapted.model.named_parameters()}
    if adapted.soft_prompt is not None:
        names[id(adapted.soft_prompt.embeddings)] = "soft_prompt.embeddings"
    return {names[id(p)]: p for p in adapted.trainable}


def data_digest(examples: list[Encoded]) -> str:
    """Fingerprint of the tokenized training set: a resumed run must see the very same examples."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()


def _training_settings(cfg: TrainConfig, run_config: dict | None, method: str) -> dict:
    """The settings that decide the trained weights (the data itself is checked through its digest)."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_TRAINING}
    if run_config is None:
        return {"train": train}
    return {"model": run_config["model"], "train": train, method: run_config.get(method)}


@contextlib.contextmanager
def _sigint_deferred():
    """Turn the first Ctrl-C into a request the loop honours at the next step boundary (where the state is whole:
    never half an optimizer update); a second Ctrl-C interrupts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signals reach the main thread only
        return
    previous = signal.getsignal(signal.SIGINT)
    previous = signal.default_int_handler if previous is None else previous  # None: installed outside Python

    def handler(signum, frame):
        requested.set()
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- the loop

def train(adapted: Adapted, examples: list[Encoded], cfg: TrainConfig, lr: float, *, pad_id: int,
          device: torch.device, dtype: torch.dtype, log_path: Path | None = None, progress: bool = True,
          run_dir: Path | None = None, run_config: dict | None = None) -> dict:
    """Train `adapted.trainable` on `examples`; returns timing, throughput, memory and the loss curve.

    With `run_dir`, checkpoints go to `run_dir/checkpoints/` and training continues from the newest one there.
    """
    torch.manual_seed(cfg.seed)  # dropout masks
    model = adapted.model
    params = named_trainable(adapted)
    optimizer = torch.optim.AdamW(adapted.trainable, lr=lr, weight_decay=cfg.weight_decay)
    total_steps = plan_steps(len(examples), cfg)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total_steps))
    settings, digest = _training_settings(cfg, run_config, adapted.method), data_digest(examples)

    # Progress, all of which a checkpoint carries: the log rows hold the loss curve, `tally` the unfinished epoch.
    step, rows, epochs = 0, [], []
    epoch, position, tally = 1, 0, {"seconds": 0.0, "tokens": 0, "loss": 0.0, "steps": 0}
    resumed_from = checkpoint.latest(run_dir) if run_dir is not None else None
    if resumed_from is not None:
        state = _restore(resumed_from, params, optimizer, scheduler, settings, digest)
        step, rows, epochs = state["step"], state["log"], state["epochs"]
        epoch, position, tally = state["epoch"], state["position"], state["tally"]
        print(f"resuming {adapted.method} from {resumed_from} (step {step} of {total_steps})")
    last_saved, resumed_step = resumed_from, step if resumed_from else None

    def save(epoch: int, position: int, tally: dict) -> Path | None:
        nonlocal last_saved
        if run_dir is None or step == 0:
            return last_saved
        if last_saved is not None and last_saved.name == f"step-{step:08d}":
            return last_saved
        if not all(bool(torch.isfinite(p).all()) for p in params.values()):
            _stop_non_finite("the weights", step, epoch, adapted.method, last_saved, dtype)
        weights = {f"weight/{name}": p for name, p in params.items()}
        optim_tensors, optim_meta = checkpoint.optimizer_state(optimizer)
        rng_tensors, rng_meta = checkpoint.rng_state()
        state = {"step": step, "epoch": epoch, "position": position, "tally": tally, "epochs": epochs, "log": rows,
                 "total_steps": total_steps, "method": adapted.method, "settings": settings, "data_digest": digest,
                 "optimizer": optim_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, "config": run_config}
        last_saved = checkpoint.save(run_dir, step, {**weights, **optim_tensors, **rng_tensors}, state,
                                     cfg.keep_checkpoints)
        if log_path:  # the log on disk always matches the newest checkpoint
            write_jsonl(log_path, rows)
        return last_saved

    reset_peak_memory(device)
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {adapted.method}", disable=not progress,
               dynamic_ncols=True)
    try:
        with _sigint_deferred() as stop:
            for epoch in range(epoch, cfg.epochs + 1):
                batches = epoch_batches([len(e.input_ids) for e in examples], cfg.batch_size, cfg.seed, epoch)
                started = time.perf_counter() - tally["seconds"]
                while position < len(batches) and not (cfg.max_steps and step >= cfg.max_steps):
                    if stop.is_set():
                        tally["seconds"] = time.perf_counter() - started
                        raise TrainingInterrupted(step, save(epoch, position, tally))
                    group = [collate([examples[i] for i in b], pad_id)
                             for b in batches[position:position + cfg.grad_accum]]
                    # Normalise by the summary tokens of the whole accumulation group: every token weighs the same.
                    group_targets = sum(int((g["labels"][:, 1:] != -100).sum()) for g in group)
                    step_loss, step_tokens = 0.0, 0
                    for batch in group:
                        batch = {k: v.to(device) for k, v in batch.items()}
                        with autocast(device, dtype):
                            loss_sum, _ = summary_loss(adapted, batch)
                        (loss_sum / group_targets).backward()
                        step_loss += loss_sum.item() / group_targets
                        step_tokens += int(batch["attention_mask"].sum())
                    if not math.isfinite(step_loss):
                        _stop_non_finite(f"the loss ({step_loss})", step + 1, epoch, adapted.method, last_saved, dtype)
                    if cfg.max_grad_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(adapted.trainable, cfg.max_grad_norm)
                        if not math.isfinite(norm):
                            _stop_non_finite(f"the gradient norm ({float(norm)})", step + 1, epoch, adapted.method,
                                             last_saved, dtype)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, position = step + 1, position + len(group)
                    tally["steps"] += 1
                    tally["loss"] += step_loss
                    tally["tokens"] += step_tokens
                    rows.append({"step": step, "epoch": epoch, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}",
                                    tok_s=f"{tally['tokens'] / max(elapsed, 1e-9):.0f}")
                    bar.update()
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and position < len(batches):
                        pause = time.perf_counter()
                        tally["seconds"] = pause - started
                        save(epoch, position, tally)
                        started += time.perf_counter() - pause  # saving is not training time
                seconds = time.perf_counter() - started
                if tally["steps"]:
                    epochs.append({"epoch": epoch, "seconds": seconds, "tokens": tally["tokens"],
                                   "tokens_per_s": tally["tokens"] / seconds,
                                   "mean_loss": tally["loss"] / tally["steps"]})
                position, tally = 0, {"seconds": 0.0, "tokens": 0, "loss": 0.0, "steps": 0}
                save(epoch + 1, position, tally)
            if stop.is_set():  # Ctrl-C during the last step: everything is saved, but the user asked to stop
                raise TrainingInterrupted(step, last_saved)
    finally:
        bar.close()
        model.eval()
    if log_path:
        write_jsonl(log_path, rows)
    seconds = sum(e["seconds"] for e in epochs)
    tokens = sum(e["tokens"] for e in epochs)
    return {"epochs": epochs, "steps": step, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(device),
            "loss_curve": [[r["step"], r["loss"]] for r in rows],
            "resumed_from_step": resumed_step}


def _restore(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler, settings: dict,
             digest: str) -> dict:
    """Load checkpoint `path` into weights, optimizer, scheduler and RNGs; returns its state (position, log...)."""
    tensors, state = checkpoint.load(path)
    _check_compatible(path, state, settings, digest, params, tensors)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"weight/{name}"])
    checkpoint.load_optimizer_state(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(tensors, state["rng"])
    return state


def _check_compatible(path: Path, state: dict, settings: dict, digest: str, params: dict, tensors: dict) -> None:
    start_over = "rerun with the same settings, or pass --overwrite to start over"
    changes = checkpoint.config_changes(state["settings"], settings)
    if changes:
        raise UserError(f"checkpoint {path} was written with other settings ({'; '.join(changes[:3])}); {start_over}")
    if state["data_digest"] != digest:
        raise UserError(f"checkpoint {path} was trained on other examples (did the data change?); {start_over}")
    for name, p in params.items():
        saved = tensors.get(f"weight/{name}")
        if saved is None or tuple(saved.shape) != tuple(p.shape):
            raise UserError(f"checkpoint {path} does not fit this model ({name}); {start_over}")


def _stop_non_finite(what: str, step: int, epoch: int, method: str, last_saved: Path | None,
                     dtype: torch.dtype) -> None:
    kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
    fp32 = " or --precision fp32" if dtype != torch.float32 else ""
    raise UserError(f"training stopped: {what} is not finite at step {step} (epoch {epoch}); {kept}; "
                    f"try a lower learning rate (--{method}.lr){fp32}, with --overwrite to start over")

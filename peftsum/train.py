"""The training loop: AdamW over the method's trainable parameters, warmup + decay, clipping, bf16 autocast.

Readable in one sitting on purpose. Per-step losses go to `train_log.jsonl`; the returned dict holds per-epoch wall
time and throughput (real tokens only: padding and virtual tokens do not count).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import Encoded
from .forward import autocast, collate, summary_loss
from .methods import Adapted


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


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A seeded shuffle of example indices, cut into batches; the same seed and epoch give the same batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def plan_steps(n: int, cfg: TrainConfig) -> int:
    per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


# ---------------------------------------------------------------- the loop

def train(adapted: Adapted, examples: list[Encoded], cfg: TrainConfig, lr: float, *, pad_id: int,
          device: torch.device, dtype: torch.dtype, log_path: Path | None = None, progress: bool = True) -> dict:
    """Train `adapted.trainable` on `examples`; returns timing, throughput, memory and the loss curve."""
    torch.manual_seed(cfg.seed)  # dropout masks
    model = adapted.model
    optimizer = torch.optim.AdamW(adapted.trainable, lr=lr, weight_decay=cfg.weight_decay)
    total_steps = plan_steps(len(examples), cfg)
    warmup = int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, warmup, total_steps))
    log = log_path.open("w") if log_path else None
    reset_peak_memory(device)
    model.train()
    step, curve, epochs = 0, [], []
    bar = tqdm(total=total_steps, desc=f"train {adapted.method}", disable=not progress, dynamic_ncols=True)
    try:
        for epoch in range(1, cfg.epochs + 1):
            batches = epoch_batches(len(examples), cfg.batch_size, cfg.seed, epoch)
            started, epoch_tokens, epoch_loss, epoch_steps = time.perf_counter(), 0, 0.0, 0
            for first in range(0, len(batches), cfg.grad_accum):
                if cfg.max_steps and step >= cfg.max_steps:
                    break
                group = [collate([examples[i] for i in b], pad_id) for b in batches[first:first + cfg.grad_accum]]
                # Normalise by the summary tokens of the whole accumulation group: every token weighs the same.
                group_targets = sum(int((g["labels"][:, 1:] != -100).sum()) for g in group)
                step_loss = 0.0
                for batch in group:
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with autocast(device, dtype):
                        loss_sum, _ = summary_loss(adapted, batch)
                    (loss_sum / group_targets).backward()
                    step_loss += loss_sum.item() / group_targets
                    epoch_tokens += int(batch["attention_mask"].sum())
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(adapted.trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_steps += 1
                epoch_loss += step_loss
                curve.append([step, step_loss])
                if log:
                    log.write(json.dumps({"step": step, "epoch": epoch, "loss": step_loss,
                                          "lr": scheduler.get_last_lr()[0]}) + "\n")
                elapsed = time.perf_counter() - started
                bar.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}", tok_s=f"{epoch_tokens / max(elapsed, 1e-9):.0f}")
                bar.update()
            seconds = time.perf_counter() - started
            if epoch_steps:
                epochs.append({"epoch": epoch, "seconds": seconds, "tokens": epoch_tokens,
                               "tokens_per_s": epoch_tokens / seconds, "mean_loss": epoch_loss / epoch_steps})
    finally:
        bar.close()
        if log:
            log.close()
        model.eval()
    seconds = sum(e["seconds"] for e in epochs)
    tokens = sum(e["tokens"] for e in epochs)
    return {"epochs": epochs, "steps": step, "seconds": seconds, "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(device),
            "loss_curve": curve}

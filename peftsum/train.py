"""The training loop: AdamW over the method's trainable parameters, warmup + decay, clipping, bf16 autocast.

Readable in one sitting on purpose. Per-step losses go to `train_log.jsonl` (rewritten with each checkpoint, so it
always matches the newest one); the returned dict holds per-epoch wall time and throughput (real tokens only: padding
and virtual tokens do not count; time spent writing checkpoints does not count either).

Given a run folder, the loop checkpoints every `checkpoint_every` steps and at each epoch end, and continues from the
newest checkpoint found there; the resumed run ends with the same weights as an uninterrupted one. Ctrl-C (or
SIGTERM, SIGHUP: signals.py) finishes the current step, writes a checkpoint and raises `TrainingInterrupted`; a NaN
or infinite loss stops the run before it can reach the weights.

Started as several processes (`torchrun`, `accelerate launch`: see distributed.py), the loop is data-parallel over
the same global batches: each rank runs its slice of every batch, the loss is normalised by the summary tokens of the
whole global batch and the gradients are summed across ranks, so a step equals the single-process step up to the
order of float additions. Every rank holds the same weights; rank 0 alone writes checkpoints and the log. Dropout
masks differ per rank (rank r seeds with seed + r; rank 0 draws what a single process draws). With `fsdp`, the model
is sharded over the ranks (torch FSDP2, full fine-tuning) and its loss comes from the model's own forward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, distributed, signals
from .compiled import compiled_blocks
from .config import TrainConfig
from .data import IGNORE, Encoded
from .errors import UserError
from .files import write_jsonl
from .forward import autocast, collate, summary_loss
from .methods import Adapted

# Settings that change how often state is saved, not what is trained: a run may resume with other values.
# `compile` is one of them: it changes how fast, and the float rounding of fused kernels, not what is trained.
NOT_TRAINING = ("checkpoint_every", "keep_checkpoints", "compile")


class TrainingInterrupted(KeyboardInterrupt):
    """A stop signal during training (Ctrl-C, SIGTERM, SIGHUP), raised once a checkpoint of the last finished step is
    on disk."""

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


def plan_steps(n: int, cfg: TrainConfig) -> int | None:
    """Optimizer steps the run will take; None under a budget with no step cap (it ends when the budget does)."""
    if budget_of(cfg) is not None:
        return cfg.max_steps or None
    per_epoch = math.ceil(math.ceil(n / cfg.batch_size) / cfg.grad_accum)
    total = per_epoch * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def budget_of(cfg: TrainConfig) -> dict | None:
    """The run's equal-budget limit, {"kind": "seconds" | "tokens", "limit": ...}, or None for an epoch-bound run."""
    if cfg.budget_seconds:
        return {"kind": "seconds", "limit": cfg.budget_seconds}
    if cfg.budget_tokens:
        return {"kind": "tokens", "limit": cfg.budget_tokens}
    return None


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


# ---------------------------------------------------------------- the loop

def whole_model_loss(adapted: Adapted, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`summary_loss` through the model's own forward, which FSDP needs (its hooks run on the root module).

    In a left-padded batch every summary ends the row, so the LM head runs over the last columns only: from the first
    column that predicts a summary token in any row.
    """
    labels, mask = batch["labels"], batch["attention_mask"]
    targets = labels[:, 1:]
    keep = targets != IGNORE
    columns = keep.any(0).nonzero()
    first = int(columns[0]) if len(columns) else targets.shape[1] - 1
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = adapted.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=labels.shape[1] - first).logits[:, :-1]
    keep = keep[:, first:]
    return F.cross_entropy(logits[keep].float(), targets[:, first:][keep], reduction="sum"), int(keep.sum())


def train(adapted: Adapted, examples: list[Encoded], cfg: TrainConfig, lr: float, *, pad_id: int,
          device: torch.device, dtype: torch.dtype, log_path: Path | None = None, progress: bool = True,
          run_dir: Path | None = None, run_config: dict | None = None, fsdp: bool = False) -> dict:
    """Train `adapted.trainable` on `examples`; returns timing, throughput, memory and the loss curve.

    With `run_dir`, checkpoints go to `run_dir/checkpoints/` and training continues from the newest one there.
    With `fsdp`, `adapted.model` is already sharded (`distributed.fully_shard_model`) and `adapted.trainable` holds
    its sharded parameters.
    """
    rank, world, main = distributed.rank(), distributed.world(), distributed.is_main()
    torch.manual_seed(cfg.seed + rank)  # dropout masks
    model = adapted.model
    params = named_trainable(adapted)
    loss_of = whole_model_loss if fsdp else summary_loss
    optimizer = torch.optim.AdamW(adapted.trainable, lr=lr, weight_decay=cfg.weight_decay)
    total_steps, budget = plan_steps(len(examples), cfg), budget_of(cfg)
    spent = {"progress": 0.0, "per_step": 0.0}  # under a budget: what the schedule follows instead of the step
    if budget is None:
        factor = lr_lambda(cfg.schedule, int(cfg.warmup_ratio * total_steps), total_steps)
    else:
        def factor(_step: int) -> float:
            return budget_factor(cfg.schedule, cfg.warmup_ratio, spent["progress"], spent["per_step"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    settings, digest = _training_settings(cfg, run_config, adapted.method), data_digest(examples)
    # What `summary_loss` counts in each example, in whatever batch (and on whatever rank) it lands.
    targets = [sum(label != IGNORE for label in e.labels[1:]) for e in examples]

    # Progress, all of which a checkpoint carries: the log rows hold the loss curve, `tally` the unfinished epoch.
    step, rows, epochs = 0, [], []
    epoch, position, tally = 1, 0, {"seconds": 0.0, "tokens": 0, "loss": 0.0, "steps": 0}
    resumed_from = checkpoint.latest(run_dir) if run_dir is not None else None
    if world > 1 and len(set(distributed.gather_objects([resumed_from and resumed_from.name]))) > 1:
        raise UserError(f"the processes see different checkpoints in {run_dir}: with several machines, the output "
                        f"folder must be on a file system they all share")
    if resumed_from is not None:
        with checkpoint.reading(resumed_from):  # a damaged or incomplete checkpoint: one line naming it
            state = _restore(resumed_from, params, optimizer, scheduler, settings, digest, device, cfg.seed)
            step, rows, epochs = state["step"], state["log"], state["epochs"]
            epoch, position, tally = state["epoch"], state["position"], state["tally"]
        print(f"resuming {adapted.method} from {resumed_from} (step {step}"
              f"{f' of {total_steps}' if total_steps else ''})")
    if not fsdp:
        distributed.broadcast_params(adapted.trainable)  # a no-op in one process
    last_saved, resumed_step = resumed_from, step if resumed_from else None

    def save(epoch: int, position: int, tally: dict) -> Path | None:
        """Write a checkpoint (rank 0); with several processes every rank calls this together."""
        nonlocal last_saved
        if run_dir is None or step == 0:
            return last_saved
        if last_saved is not None and last_saved.name == f"step-{step:08d}":
            return last_saved
        finite = all(bool(torch.isfinite(distributed.local_part(p)).all()) for p in params.values())
        if fsdp:  # each rank saw only its shard
            finite = not distributed.all_reduce_sum(torch.tensor([float(not finite)], device=device)).item()
        if not finite:
            _stop_non_finite("the weights", step, epoch, adapted.method, last_saved, dtype)
        weights = {f"weight/{name}": distributed.full_tensor(p, keep=main) for name, p in params.items()}
        optim_tensors, optim_meta = checkpoint.optimizer_state(optimizer)
        optim_tensors = {k: distributed.full_tensor(v, keep=main) for k, v in optim_tensors.items()}
        rng_tensors, rng_meta = checkpoint.rng_state(all_cuda=world == 1)
        if world > 1:
            rng_tensors.update(_rank_rng(device))
        state = {"step": step, "epoch": epoch, "position": position, "tally": tally, "epochs": epochs, "log": rows,
                 "total_steps": total_steps, "method": adapted.method, "settings": settings, "data_digest": digest,
                 "optimizer": optim_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, "config": run_config}
        if main:
            last_saved = checkpoint.save(run_dir, step, {**weights, **optim_tensors, **rng_tensors}, state,
                                         cfg.keep_checkpoints)
            if log_path:  # the log on disk always matches the newest checkpoint
                write_jsonl(log_path, rows)
        distributed.barrier()
        if not main:
            last_saved = Path(run_dir) / checkpoint.FOLDER / f"step-{step:08d}"
        return last_saved

    agreed = {"stop": False}  # with several processes, all stop at the same step: the one they agree on

    def stop_requested(stop: signals.StopSignal, now: bool = False) -> bool:
        if world == 1:
            return stop.is_set()
        if now:
            flag = torch.tensor([float(stop.is_set())], device=device)
            agreed["stop"] = bool(distributed.all_reduce_sum(flag).item())
        return agreed["stop"]

    def budget_spent(elapsed: float, tokens: int) -> float:
        """The share of the budget spent: finished epochs plus the current one's `elapsed` seconds or `tokens`."""
        key = "seconds" if budget["kind"] == "seconds" else "tokens"
        done = sum(e[key] for e in epochs) + (elapsed if key == "seconds" else tokens)
        if key == "seconds" and world > 1:  # clocks differ: all processes follow rank 0's, so they stop together
            done = distributed.broadcast_object(done)
        return done / budget["limit"]

    def out_of_steps() -> bool:
        if cfg.max_steps and step >= cfg.max_steps:
            return True
        return budget is not None and spent["progress"] >= 1.0

    reset_peak_memory(device)
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {adapted.method}", disable=not progress or not main,
               dynamic_ncols=True)
    lengths = [len(e.input_ids) for e in examples]
    try:
        with signals.StopSignal() as stop, compiled_blocks(model, device, max(lengths, default=0),
                                                         enabled=cfg.compile and not fsdp):
            # Under a budget, epochs go on until the budget is spent, the last one usually partial.
            while budget is not None or epoch <= cfg.epochs:
                batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch)
                started = time.perf_counter() - tally["seconds"]
                if budget is not None:
                    spent["progress"] = budget_spent(tally["seconds"], tally["tokens"])
                if out_of_steps():
                    break
                while position < len(batches) and not out_of_steps():
                    if stop_requested(stop):
                        tally["seconds"] = time.perf_counter() - started
                        raise TrainingInterrupted(step, save(epoch, position, tally))
                    group = batches[position:position + cfg.grad_accum]
                    # Normalise by the summary tokens of the whole accumulation group: every token weighs the same.
                    group_targets = sum(targets[i] for b in group for i in b)
                    step_loss, step_tokens = 0.0, 0
                    for global_batch in group:
                        mine = [global_batch[i] for i in distributed.shard(global_batch)]  # all of it in 1 process
                        idle = not mine  # a batch with fewer examples than there are processes
                        if idle and not fsdp:
                            continue
                        batch = collate([examples[i] for i in mine or global_batch[:1]], pad_id)
                        batch = {k: v.to(device) for k, v in batch.items()}
                        with autocast(device, dtype):
                            loss_sum, _ = loss_of(adapted, batch)
                        if idle:  # FSDP needs every rank in every forward and backward: a stand-in adding nothing
                            loss_sum = loss_sum * 0.0
                        (loss_sum / group_targets).backward()
                        step_loss += loss_sum.item() / group_targets
                        step_tokens += 0 if idle else int(batch["attention_mask"].sum())
                    if world > 1:
                        totals = torch.tensor([step_loss, step_tokens, stop.is_set()], dtype=torch.float64,
                                              device=device)
                        distributed.all_reduce_sum(totals)
                        step_loss, step_tokens, agreed["stop"] = totals[0].item(), int(totals[1]), bool(totals[2])
                        if not fsdp:  # FSDP reduces its gradients itself
                            distributed.all_reduce_grads(adapted.trainable)
                    if not math.isfinite(step_loss):
                        _stop_non_finite(f"the loss ({step_loss})", step + 1, epoch, adapted.method, last_saved, dtype)
                    if cfg.max_grad_norm > 0:
                        norm = torch.nn.utils.clip_grad_norm_(adapted.trainable, cfg.max_grad_norm)
                        norm = distributed.full_tensor(norm)
                        if not math.isfinite(norm):
                            _stop_non_finite(f"the gradient norm ({float(norm)})", step + 1, epoch, adapted.method,
                                             last_saved, dtype)
                    optimizer.step()
                    if budget is not None:  # the next step's learning rate follows the share spent so far
                        spent["progress"] = budget_spent(time.perf_counter() - started, tally["tokens"] + step_tokens)
                        spent["per_step"] = spent["progress"] / (step + 1)
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step, position = step + 1, position + len(group)
                    tally["steps"] += 1
                    tally["loss"] += step_loss
                    tally["tokens"] += step_tokens
                    rows.append({"step": step, "epoch": epoch, "loss": step_loss, "lr": scheduler.get_last_lr()[0]})
                    elapsed = time.perf_counter() - started
                    bar.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}",
                                    tok_s=f"{tally['tokens'] / max(elapsed, 1e-9):.0f}",
                                    **({"budget": f"{min(1.0, spent['progress']):.0%}"} if budget else {}))
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
                                   "mean_loss": tally["loss"] / tally["steps"],
                                   "batches": position, "of_batches": len(batches)})
                position, tally = 0, {"seconds": 0.0, "tokens": 0, "loss": 0.0, "steps": 0}
                epoch += 1
                save(epoch, position, tally)
            if stop_requested(stop, now=True):  # Ctrl-C during the last step: all is saved, but the user asked to stop
                raise TrainingInterrupted(step, last_saved)
    finally:
        bar.close()
        model.eval()
    if log_path and main:
        write_jsonl(log_path, rows)
    seconds = sum(e["seconds"] for e in epochs)
    tokens = sum(e["tokens"] for e in epochs)
    result = {"epochs": epochs, "steps": step, "seconds": seconds, "tokens": tokens, "budget": budget,
              "epochs_completed": sum(e.get("batches", 1) / e.get("of_batches", 1) for e in epochs),
              "tokens_per_s": tokens / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(device),
              "loss_curve": [[r["step"], r["loss"]] for r in rows],
              "resumed_from_step": resumed_step}
    if world > 1:  # tokens count every process's; time and memory are rank 0's
        result["processes"] = world
    return result


def _rank_rng(device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's torch (and CUDA) generator state, for rank 0's checkpoint (a collective: all ranks call it)."""
    own = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    return {f"rng/rank{r}/{key}": value for r, states in enumerate(distributed.gather_objects([own]))
            for key, value in states.items()}


def _restore_rank_rng(tensors: dict[str, torch.Tensor], device: torch.device, seed: int, step: int) -> None:
    """This rank's generators as checkpointed; reseeded where the checkpoint came from fewer processes."""
    rank = distributed.rank()
    own, cuda = tensors.get(f"rng/rank{rank}/torch"), tensors.get(f"rng/rank{rank}/cuda")
    if own is None and rank > 0:
        torch.manual_seed((seed + rank) * 1_000_003 + step)
    elif own is not None:
        torch.set_rng_state(own)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _restore(path: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler, settings: dict,
             digest: str, device: torch.device, seed: int) -> dict:
    """Load checkpoint `path` into weights, optimizer, scheduler and RNGs; returns its state (position, log...)."""
    tensors, state = checkpoint.load(path)
    _check_compatible(path, state, settings, digest, params, tensors)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(distributed.shard_like(tensors[f"weight/{name}"], p))
    order = [p for group in optimizer.param_groups for p in group["params"]]
    for key, value in list(tensors.items()):  # FSDP: the moments of a sharded parameter are sharded like it
        if key.startswith("optimizer/"):
            p = order[int(key.split("/")[1])]
            if distributed.is_sharded(p) and tuple(value.shape) == tuple(p.shape):
                tensors[key] = distributed.shard_like(value, p)
    checkpoint.load_optimizer_state(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.set_rng_state(tensors, state["rng"], all_cuda=distributed.world() == 1)
    if distributed.world() > 1:
        _restore_rank_rng(tensors, device, seed, state["step"])
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

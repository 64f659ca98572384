"""Several processes, one run: what peftsum needs when `torchrun` or `accelerate launch` starts N copies of it.

Each process (a *rank*) joins one process group through accelerate's `PartialState`: gloo on CPUs, nccl on CUDA,
each process on the GPU of its local rank. Started as one process (`peftsum ...`, `python -m peftsum ...`), nothing
is initialised and every helper here is a no-op: rank 0 of a world of 1.

Training stays data-parallel without wrapping the model (the loss calls the base model and the LM head separately,
which DDP would not see): each rank takes its slice of every global batch and the gradients of the trainable
parameters are summed across ranks after backward (`all_reduce_grads`).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that use it: the command line reads the launcher's environment (rank, world
# size) before torch is loaded, and one-process commands that never need torch start without it.
_device = None  # this process's torch.device, once it has joined the group
_local_rank = 0  # its rank on its own machine


def _from_env(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def launched() -> bool:
    """True in a process started by a launcher (torchrun, accelerate launch, mpirun) with several processes in all."""
    return _from_env(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1) > 1


def launch_rank() -> int:
    """This process's rank as its launcher set it, before the group is joined (0 in a single process)."""
    return _from_env(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0) if launched() else 0


def init(device: str = "auto") -> torch.device | None:
    """Join the process group (once, when launched); returns this process's device, or None for a single process."""
    global _device, _local_rank
    import torch

    if not launched():
        return None
    if _device is None:
        if device == "mps" or device.startswith("cuda:"):
            raise UserError(f"model.device {device!r} cannot be shared by several processes; use auto, cuda or cpu "
                            f"(each process takes the GPU of its local rank)")
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError("model.device is cuda, but this machine has no CUDA device")
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
        _device = torch.device("cpu") if state.device.type == "cpu" else state.device
        _local_rank = state.local_process_index
    return _device


def device() -> torch.device | None:
    """This process's device once it has joined a process group (`init`), else None (one process: the caller picks)."""
    return _device


def shutdown(wait: bool = True) -> None:
    """Leave the process group, after the others reach this point too (`wait`, on success). Exiting without this
    can abort the process (gloo's threads still running); exiting alone can abort a peer still at work."""
    global _device
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
    _device = None


def device_choice(device: str) -> str:
    """model.device, with `accelerate launch --cpu` turning 'auto' into 'cpu'."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return "cpu" if device == "auto" and use_cpu else device


def accelerate_precision() -> str | None:
    """model.precision as accelerate's configuration gives it (`accelerate launch --mixed_precision`), if it does."""
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mixed is None:
        return None
    if mixed.lower() not in ("no", "bf16"):
        raise UserError(f"accelerate's mixed_precision {mixed!r} is not supported: peftsum computes in bf16 or fp32; "
                        f"launch with --mixed_precision bf16 or no")
    return "bf16" if mixed.lower() == "bf16" else "fp32"


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if world() > 1:
        dist.barrier()


def shard(items) -> list[int]:
    """The indices of `items` this rank handles: rank, rank + world, ... (every index on exactly one rank)."""
    return list(range(rank(), len(items), world()))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` across ranks, in place; returns it."""
    import torch.distributed as dist

    if world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: list[torch.nn.Parameter], bucket: int = 1 << 25) -> None:
    """Sum each parameter's gradient across ranks, in buckets of up to `bucket` values. A gradient missing on some
    ranks counts as zeros there; one missing on every rank stays missing (AdamW then skips it, as in one process)."""
    import torch
    import torch.distributed as dist

    if world() == 1:
        return
    unique = list({id(p): p for p in params}.values())
    if not unique:
        return
    present = torch.tensor([p.grad is not None for p in unique], dtype=torch.float32, device=unique[0].device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    unique = [p for p, count in zip(unique, present.tolist()) if count > 0]
    for p in unique:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    start = 0
    while start < len(unique):
        end, size = start, 0
        while end < len(unique) and (end == start or size + unique[end].numel() <= bucket):
            size, end = size + unique[end].numel(), end + 1
        grads = [p.grad for p in unique[start:end]]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
        start = end


def broadcast_params(params: list[torch.nn.Parameter]) -> None:
    """Rank 0's values of `params` on every rank: replicas start identical whatever each rank initialised."""
    import torch
    import torch.distributed as dist

    if world() > 1:
        with torch.no_grad():
            for p in {id(p): p for p in params}.values():
                dist.broadcast(p.data, src=0)


def gather_objects(items: list) -> list:
    """Every rank's `items` (picklable), concatenated in rank order, on every rank."""
    import torch.distributed as dist

    if world() == 1:
        return list(items)
    gathered: list = [None] * world()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def broadcast_object(obj):
    """Rank 0's `obj`, on every rank."""
    import torch.distributed as dist

    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args, **kwargs):
    """Run `fn` on rank 0 only (file work: claiming, clearing folders); every rank gets its result or its UserError."""
    if world() == 1:
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except UserError as exc:
            error = str(exc)
    result, error = broadcast_object((result, error))
    if error is not None:
        exc = UserError(error)
        exc.from_main = not is_main()  # rank 0 prints it; the others need not repeat it
        raise exc
    return result


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first, then the first process of each other machine, then the rest: caches (converted
    model, downloads) are filled once per machine, shared file system or not, before the others read them."""
    turn = 0 if is_main() else 1 if _local_rank == 0 else 2
    for _ in range(turn):
        barrier()
    try:
        yield
    finally:
        for _ in range(turn, 2):
            barrier()


# ---------------------------------------------------------------- FSDP: full fine-tuning sharded over the ranks

def fsdp_requested(flag: bool = False) -> bool:
    """--fsdp, or `accelerate launch --use_fsdp`."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def fully_shard_model(model: torch.nn.Module, blocks, device: torch.device) -> None:
    """Shard `model` in place (torch FSDP2) over all ranks: a unit per block, the rest (embeddings, head) in the root.

    Gradients are summed, not averaged, across ranks, as in `all_reduce_grads`: the loss is already normalised by the
    summary tokens of the global batch.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise UserError("peftsum's FSDP does not offload parameters to the CPU; launch without --fsdp_offload_params")
    mesh = init_device_mesh(device.type, (world(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied one)


def is_sharded(tensor: torch.Tensor) -> bool:
    if world() == 1:  # FSDP runs only across processes
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """The whole of a sharded tensor on the CPU (a collective: every rank calls it; None where not `keep`), or the
    tensor itself."""
    if not is_sharded(tensor):
        return tensor
    whole = tensor.full_tensor()
    return whole.cpu() if keep else None


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut into this rank's part of `like` (a sharded tensor of the same shape); no communication."""
    from torch.distributed.tensor import distribute_tensor

    if not is_sharded(like):
        return full
    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)

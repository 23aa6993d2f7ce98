"""Several processes training one model: the torch.distributed set-up and the few collectives the loop needs.

Used in notebook 09 (experiments), multi-GPU: `gpt2lab.train.train` runs data-parallel whenever a process group of
more than one process is initialised, so a script (or `python -m gpt2lab.experiments run`) started by

    torchrun --nproc_per_node 2 -m gpt2lab.experiments run --task paraphrase --method full+adamw

calls `init_from_env()` once and then `train(...)` exactly as in one process. On a CPU the backend is gloo (the tests
run 2 processes that way); on CUDA it is NCCL with process k on cuda:LOCAL_RANK.

What the loop does with several processes (`world_size() > 1`):

* `config.batch_size` is the GLOBAL batch. Every rank draws the same global batches (the same seeded order) and
  takes its share `batch[rank::world]` (`shard`).
* Each rank's loss is weighted by its share of the global normaliser (the number of loss terms: target tokens for
  the LM loss, examples for the cloze loss) and the gradients are SUMMED (`all_reduce_gradients`), so the step is
  the one a single process takes on the whole global batch, up to float rounding. A plain average of per-rank means
  would weight a rank holding short sonnets as much as one holding long ones.
* The logged loss is the global mean, token counts are summed; evaluation runs on rank 0 and its metrics are
  broadcast (`broadcast_object`), so early stopping agrees; only rank 0 holds the run lock and writes checkpoints,
  best.pt and record.json; the other ranks read them after a `barrier()` (resume, restore_best).

Why an explicit all-reduce and not torch.nn.parallel.DistributedDataParallel. DDP wraps the model and reduces
gradients from hooks it arms in each forward, for the backward that follows. Here (1) tasks reach into the model:
ParaphraseTask calls `model.hidden_states` and `model.head`, SMART the token-embedding module; the wrapper hides
those attributes, and calling them on the inner module bypasses DDP's forward, so the reduction is not armed;
(2) SMART runs several forwards per step (the clean one, ascent steps differentiated with torch.autograd.grad, the
perturbed one) before its one backward, against DDP's one-forward-one-backward bookkeeping. One flat all-reduce
after backward works for any task, objective and callback, and the model stays the model. What it gives up is
DDP's overlap of communication with backward: GPT-2 small's 124M fp32 gradients are about 0.5 GB, a few
milliseconds per step over NVLink; across nodes it would matter more.

Not for optimizers whose statistics come from hooks on the backward pass (AdaPreLoRA): each rank would see only its
own shard's statistics, so the loop refuses them with more than one process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """Whether a torch.distributed process group is up in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the process that evaluates, prints and writes files."""
    return rank() == 0


def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int, torch.device | None]:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    Returns (rank, world_size, device). One process (no WORLD_SIZE, or 1): nothing to join, (0, 1, None). Backend
    NCCL with device cuda:LOCAL_RANK when CUDA is available, else gloo on the CPU (`backend` overrides). Calling it
    again in a process that has joined returns the same answer.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {name} is not set: start the processes with torchrun "
                               "(torchrun --nproc_per_node N ...), which sets them")
    local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives and the object helpers use the current device
    if not is_initialized():
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return rank(), world_size(), device


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if world_size() > 1:
        dist.barrier()


def destroy() -> None:
    """Leave the process group (no-op when there is none)."""
    if is_initialized():
        dist.destroy_process_group()


def _comm_device(device: torch.device | None = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the given device or the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device if device is not None else torch.device("cpu")


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's share of a global batch: items[rank::world] (interleaved, so a length-sorted batch splits evenly)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(items[rank_::world])


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks of `values` (a new tensor on `values`' device; a copy in one process)."""
    out = values.detach().clone()
    if world_size() > 1:
        moved = out.to(_comm_device(out.device))
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        out = moved.to(values.device)
    return out


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Replace every parameter's .grad by the sum over ranks, in one flat all-reduce.

    A parameter with no gradient on a rank (a rank whose share of the batch was empty, a branch it did not take)
    adds zeros; a parameter with no gradient on EVERY rank keeps grad None, as in one process, so optimizers that
    skip such parameters (AdamW: no moment update, no weight decay) still skip them. Gradients of different dtypes
    or devices are reduced in one buffer per (dtype, device).
    """
    if world_size() <= 1 or not params:
        return
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)  # (P,)
    flags = all_reduce_sum(flags)  # (P,) how many ranks have a gradient for each parameter
    for (dtype, device), idx in groups.items():
        flat = torch.cat([params[i].grad.reshape(-1) if params[i].grad is not None
                          else torch.zeros(params[i].numel(), dtype=dtype, device=device) for i in idx])  # (N,)
        flat = all_reduce_sum(flat)  # (N,)
        offset = 0
        for i in idx:
            p, n = params[i], params[i].numel()
            if flags[i] > 0:
                p.grad = flat[offset : offset + n].view_as(p)
            offset += n


def broadcast_object(obj=None, src: int = 0):
    """`obj` as rank `src` has it, on every rank (pickled; for small things: metrics, records, flags)."""
    if world_size() <= 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; e.g. each rank's RNG state for a checkpoint)."""
    if world_size() <= 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


__all__ = ["all_gather_object", "all_reduce_gradients", "all_reduce_sum", "barrier", "broadcast_object", "destroy",
           "init_from_env", "is_initialized", "is_main", "rank", "shard", "world_size"]

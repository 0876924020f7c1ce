"""Multi-process training helpers: who am I (``torchrun`` environment), the data shard of each rank, reductions.

The shard of a rank is a pure function of (seed, epoch, rank, world size), so a resumed or re-run job reads
exactly the same images in the same order. A single process is the special case world size 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from xraydeconv.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Rank of this process, number of processes, and rank on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by ``torchrun``; a single process without them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL when training on CUDA, gloo on CPU."""
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def set_threads(threads: int | None, info: DistInfo) -> None:
    """CPU threads of this process: ``threads`` (UserError naming ``--threads`` when unusable here), else, under
    ``torchrun`` (which sets ``OMP_NUM_THREADS=1``), the machine's cores divided among its processes, else torch's
    default."""
    from xraydeconv.device import available_cores, check_threads

    if threads is not None:
        torch.set_num_threads(check_threads(threads))
    elif info.enabled:
        torch.set_num_threads(max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the ``n`` training samples in ``epoch``: depends on nothing but (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, info: DistInfo) -> list[list[int]]:
    """The per-step index lists this rank trains on in ``epoch``.

    ``batch_size`` is the global batch: each step takes the next ``batch_size`` samples of the epoch's
    permutation and rank ``r`` gets every ``world_size``-th of them starting at ``r``. The permutation is
    padded by wrapping around to a multiple of the world size, so every rank has the same number of steps
    and a non-empty batch in each (as ``DistributedSampler`` does).
    """
    perm = epoch_permutation(n, seed, epoch)
    w = info.world_size
    if n % w:
        perm = torch.cat([perm, perm[: w - n % w]])
    out = []
    for start in range(0, len(perm), batch_size):
        chunk = perm[start : start + batch_size]
        out.append(chunk[info.rank :: w].tolist())
    return out


def eval_shard(n: int, info: DistInfo) -> list[int]:
    """The evaluation samples of this rank: every ``world_size``-th, no padding (counts are summed later)."""
    return list(range(info.rank, n, info.world_size))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place when distributed); the tensor itself when single-process."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` when single-process)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: object, info: DistInfo) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (``[obj]`` when single-process), None on the other ranks."""
    if not info.enabled:
        return [obj]
    out: list | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def raise_first(errors: list, info: DistInfo) -> None:
    """Every rank's ``(position, message)`` of the error that stopped it, or None (as gathered from all ranks):
    the first in the run's order is raised on rank 0 as a UserError; the other ranks exit with status 2 and leave
    the message to it. Nothing happens when no rank failed."""
    found = sorted(e for e in errors if e is not None)
    if found:
        if info.is_main:
            raise UserError(found[0][1])
        raise SystemExit(2)

"""The one device resolver of the command line: ``--device auto|cpu|cuda|cuda:N``."""

from __future__ import annotations

import os
import re

import torch

from xraydeconv.errors import UserError

__all__ = ["resolve_device", "available_cores", "check_threads", "MAX_THREADS_PER_CORE"]

# more threads than this per core only oversubscribe, and very many crash the OpenMP runtime
MAX_THREADS_PER_CORE = 4


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(threads: int, flag: str = "--threads") -> int:
    """``threads`` when it is a usable thread count here (1 to 4 per core); UserError naming ``flag`` otherwise."""
    most = MAX_THREADS_PER_CORE * available_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= most:
        raise UserError(f"{flag} {threads}: must be between 1 and {MAX_THREADS_PER_CORE} per core ({most} here)")
    return threads


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The torch device for ``--device NAME``; UserError when it is not usable here.

    ``auto`` takes CUDA when available. Under ``torchrun`` (``world_size`` > 1) a bare ``cuda`` means this
    process's GPU, ``cuda:<local_rank>``, and more processes on the machine than GPUs is an error.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name!r}: not a device (use auto, cpu, cuda or cuda:N)")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if world_size > 1 and local > torch.cuda.device_count():
            raise UserError(f"--device {name}: {local} processes on this machine but {torch.cuda.device_count()} "
                            "GPU(s); start one process per GPU or use --device cpu")
        if name == "cuda":
            return torch.device("cuda", local_rank)
        if int(name[5:]) >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device(name)

"""Where this process stands in a ``torch.distributed`` job, safe to ask without one."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

NOT_INITIALISED = (
    "torch.distributed is not initialised: launch with torchrun (e.g. `torchrun "
    "--nproc_per_node=2 train.py`) and call fastmeta.distributed.init_from_env() or "
    "torch.distributed.init_process_group('gloo') (CPU) / ('nccl') (GPU) first"
)


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default: the whole job); 0 outside a job."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: ProcessGroup | None = None) -> int:
    """Number of processes in ``group`` (default: the whole job); 1 outside a job."""
    return dist.get_world_size(group) if is_distributed() else 1


def is_main_process() -> bool:
    """True on global rank 0, and in a process that is not part of a job.

    The one process that writes results, figures and checkpoints.

    Example:
        >>> if fastmeta.distributed.is_main_process():
        ...     torch.save(learner.state_dict(), "checkpoint.pt")
    """
    return rank() == 0


def require_distributed(what: str) -> None:
    """Raise ``RuntimeError`` naming ``what`` if no process group is initialised."""
    if not dist.is_available():
        raise RuntimeError(
            f"{what} needs torch.distributed, which this torch build lacks "
            f"(torch.distributed.is_available() is False)"
        )
    if not dist.is_initialized():
        raise RuntimeError(f"{what}: {NOT_INITIALISED}")


def init_from_env(*, backend: str | None = None, timeout: timedelta | None = None) -> bool:
    """Join the job that ``torchrun`` describes in the environment, if there is one.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT``. With them set (and no process group yet), this initialises the
    default process group, with ``"nccl"`` and ``torch.cuda.set_device(LOCAL_RANK)`` when
    CUDA is available, ``"gloo"`` otherwise. Without them it does nothing, so one script
    runs both as ``python train.py`` and ``torchrun --nproc_per_node=N train.py``.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ... instead of the automatic choice.
        timeout: how long a collective may wait for a peer before it fails (torch's
            default is 10 minutes for gloo). A rank that dies without raising (killed,
            segfault) is only noticed after this time outside torchrun.

    Returns:
        Whether this process is now part of a job.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")

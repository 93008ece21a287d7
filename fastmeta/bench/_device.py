"""Where a benchmark runs: ``--device`` and ``--precision`` of ``fastmeta bench`` and ``eval``.

``--device auto`` picks CUDA if it is available, then Apple's MPS, then the CPU. Under
``torchrun`` every process keeps its own GPU, ``cuda:LOCAL_RANK``, whatever the flag
says about the index. Batches are built on the CPU and copied to the device before each
meta-step: from pinned memory without blocking the host on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._precision import PRECISIONS, check_precision

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The device ``--device name`` means on this machine (see the module docstring).

    Raises:
        ValueError: an unknown name, or a device this machine does not have; the message
            names the flag, the value and what to use instead.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            text = "cuda"
        elif _mps_available():
            text = "mps"
        else:
            text = "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(
            f"--device must be one of {', '.join(DEVICES)}, got {name!r}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: CUDA is not available here (torch.cuda.is_available() is "
                f"False: no GPU visible, or a CPU-only torch build); use --device cpu, or "
                f"auto to take the best device there is"
            )
        if "LOCAL_RANK" in os.environ and "RANK" in os.environ:  # torchrun: one GPU per rank
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), numbered from 0; use --device cuda:0 (or cuda)"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not _mps_available():
        raise ValueError(
            f"--device {name}: Apple's MPS backend is not available here; use --device cpu, "
            f"or auto"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    return device


def resolve_precision(name: str) -> str:
    """``--precision``'s canonical name, with the flag named in the error."""
    try:
        return check_precision(name)
    except ValueError:
        raise ValueError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}"
        ) from None


def process_group_backend(device: torch.device) -> str:
    """The ``torch.distributed`` backend for ranks that compute on ``device``."""
    return "nccl" if device.type == "cuda" else "gloo"


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors in tuples, lists, mappings and named tuples) on ``device``.

    On CUDA the tensors are pinned and copied without blocking the host, so the copy of
    one batch overlaps the work queued before it. On the CPU the batch is returned as is.
    """
    if device.type == "cpu":
        return batch

    def move(value: Any) -> Any:
        if isinstance(value, Tensor):
            if value.device == device:
                return value
            if device.type == "cuda" and value.device.type == "cpu":
                return value.pin_memory().to(device, non_blocking=True)
            return value.to(device)
        if isinstance(value, Mapping):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(move(v) for v in value))
        if isinstance(value, tuple | list):
            return type(value)(move(v) for v in value)
        return value

    return move(batch)

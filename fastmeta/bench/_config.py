"""What the benchmarks' settings dataclasses share: validation, plain-data round trips."""

from __future__ import annotations

import dataclasses
import math
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from .. import __version__

C = TypeVar("C", bound="BenchConfig")


def _flag(name: str) -> str:
    return name.replace("_", "-")


class BenchConfig:
    """Base of the frozen settings dataclasses of ``fastmeta bench`` commands."""

    algorithms: tuple[str, ...]  # declared by every subclass
    eval_steps: int

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any]) -> C:
        """Inverse of :meth:`as_dict`; unknown keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        settings: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields
        }
        return cls(**settings)

    def _validate(
        self,
        *,
        allowed_algorithms: tuple[str, ...],
        counts: Iterable[str],
        int_lists: Iterable[str],
        rates: Iterable[str],
    ) -> None:
        """Raise ``ValueError`` naming the setting (as its command-line flag) and its value."""
        algorithms = self.algorithms
        unknown = [a for a in algorithms if a not in allowed_algorithms]
        if unknown or not algorithms:
            raise ValueError(
                f"algorithms: unknown {unknown or list(algorithms)!r}; choose from "
                f"{','.join(allowed_algorithms)}"
            )
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in int_lists:
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{_flag(name)} must be integers >= 1, got {list(values)}")
        if self.eval_steps < 0:
            raise ValueError(f"eval-steps must be >= 0, got {self.eval_steps}")
        for name in rates:
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {value}")


def prepare_out(out: Path, *, resume: bool) -> Path:
    """Create ``out/checkpoints``; refuse to start over a previous run unless resuming.

    Raises:
        FileExistsError: ``out`` holds checkpoints and ``resume`` is false.
    """
    checkpoints = Path(out) / "checkpoints"
    if not resume and checkpoints.is_dir() and any(checkpoints.glob("*.pt")):
        raise FileExistsError(
            f"{out} already holds checkpoints from a run; pass --resume to continue it, or "
            f"choose another --out directory"
        )
    checkpoints.mkdir(parents=True, exist_ok=True)
    return checkpoints


def versions() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    return {
        "fastmeta": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def json_ready(value: Any) -> Any:
    """``value`` with each NaN or infinity spelled ``"nan"``, ``"inf"``, ``"-inf"`` (valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value

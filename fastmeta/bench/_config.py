"""What the benchmarks' settings dataclasses share: validation, plain-data round trips.

Every field is declared with :func:`setting`, which records its help text (and allowed
values); the command line is generated from these fields, so a default is written once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import typing
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from .. import __version__

C = TypeVar("C", bound="BenchConfig")


def _flag(name: str) -> str:
    return name.replace("_", "-")


def setting(default: Any, help: str, *, choices: tuple[Any, ...] | None = None) -> Any:
    """A configuration field with its command-line help (and allowed values).

    Args:
        default: the default value (a tuple for lists).
        help: what the setting means, without its default (the CLI adds it).
        choices: allowed values (of each element, for a tuple).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting of a configuration, as the command line presents it.

    Attributes:
        name: the field name (``eval_shots``); the flag is ``--eval-shots``.
        kind: ``int``, ``float``, ``str``, ``ints`` (tuple of int) or ``strs`` (tuple of str).
        default: the dataclass default.
        help: the help text given to :func:`setting`.
        choices: allowed values, or ``None``.
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[Any, ...] | None

    @property
    def flag(self) -> str:
        return "--" + _flag(self.name)


_KINDS = {int: "int", float: "float", str: "str", tuple[int, ...]: "ints",
          tuple[str, ...]: "strs"}


def fields_of(config_class: type[BenchConfig]) -> list[Field]:
    """The settings of ``config_class`` in declaration order (see :func:`setting`)."""
    hints = typing.get_type_hints(config_class)
    out = []
    for field in dataclasses.fields(config_class):  # type: ignore[arg-type]
        kind = _KINDS.get(hints[field.name])
        if kind is None or "help" not in field.metadata:
            raise TypeError(
                f"{config_class.__name__}.{field.name}: declare benchmark settings with "
                f"setting(default, help) and a type among int, float, str, tuple[int, ...], "
                f"tuple[str, ...]"
            )
        out.append(Field(field.name, kind, field.default, field.metadata["help"],
                         field.metadata["choices"]))
    return out


class BenchConfig:
    """Base of the frozen settings dataclasses of ``fastmeta bench`` commands.

    Every subclass declares ``algorithms``, ``seed``, ``iterations`` and
    ``checkpoint_every`` among its fields.
    """

    algorithms: tuple[str, ...]  # declared by every subclass
    seed: int
    iterations: int
    checkpoint_every: int

    # Settings that may differ between the checkpoints of one output directory (beside
    # ``algorithms`` and ``checkpoint_every``): evaluation settings, per-run settings.
    not_shared: ClassVar[tuple[str, ...]] = ()

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (tuples become lists)."""
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` (validated like a new configuration)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def shared_dict(self) -> dict[str, Any]:
        """The settings every checkpoint in one output directory must agree on."""
        skip = {"algorithms", "checkpoint_every", *self.not_shared}
        return {k: v for k, v in self.as_dict().items() if k not in skip}

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
        if len(set(algorithms)) != len(algorithms):
            raise ValueError(f"algorithms lists an algorithm twice: {list(algorithms)!r}")
        for field in fields_of(type(self)):
            value = getattr(self, field.name)
            if field.choices is not None and field.name != "algorithms":
                values = value if isinstance(value, tuple) else (value,)
                if any(v not in field.choices for v in values):
                    raise ValueError(
                        f"{_flag(field.name)} must be one of {', '.join(map(str, field.choices))}"
                        f", got {value!r}"
                    )
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in int_lists:
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise ValueError(f"{_flag(name)} must be integers >= 1, got {list(values)}")
        eval_steps = getattr(self, "eval_steps", 0)
        if eval_steps < 0:
            raise ValueError(f"eval-steps must be >= 0, got {eval_steps}")
        for name in rates:
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{_flag(name)} must be > 0, got {value}")


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
    """``value`` with each NaN or infinity spelled ``"nan"``, ``"inf"``, ``"-inf"`` (valid JSON).

    Every JSON file and ``--json`` output of ``fastmeta`` goes through this: strict JSON
    (no ``NaN``/``Infinity`` literals), non-finite numbers as those three strings.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Strict JSON text of ``value`` (non-finite numbers as strings, see :func:`json_ready`)."""
    return json.dumps(json_ready(value), indent=1, allow_nan=False)

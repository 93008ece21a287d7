"""Walks of a model's submodules, parameters and buffers, done once per structure.

Every meta-step needs the model's named parameters and buffers and its submodules (which
layers need their exact forms, which BatchNorms to switch). Walking the module tree for
each costs tens of microseconds per walk, a fixed cost per step that small models feel,
all the more under ``compile=True``.

A model's structure changes only by registering a submodule, parameter or buffer
(attribute assignment, ``add_module``, ``register_parameter``, parametrizations, tied
weights), and torch calls its global registration hooks for each. fastmeta counts those
calls and reuses a walk while the count is unchanged. What can change without a
registration is read when it is used, never cached: ``requires_grad``, ``training``,
hooks and attribute values. (``del module.weight`` alone unregisters nothing; assigning
a new one does.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as _module

_version = 0


def _registered(*_: Any) -> None:
    global _version
    _version += 1


_module.register_module_module_registration_hook(_registered)
_module.register_module_parameter_registration_hook(_registered)
_module.register_module_buffer_registration_hook(_registered)


@dataclass(frozen=True)
class Structure:
    """One walk of a module: its submodules, and where its parameters and buffers live.

    The slots are ``(qualified name, owning submodule, local name)``; tensors are read
    from the owner when asked for, so a value assigned behind torch's back (a direct
    write to ``_parameters`` or ``_buffers``) is still the one used.
    """

    modules: tuple[nn.Module, ...]
    parameter_slots: tuple[tuple[str, nn.Module, str], ...]
    buffer_slots: tuple[tuple[str, nn.Module, str], ...]
    version: int

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """As ``module.named_parameters()``."""
        found = ((name, owner._parameters.get(local)) for name, owner, local in
                 self.parameter_slots)
        return [(name, p) for name, p in found if p is not None]

    def named_buffers(self) -> dict[str, Tensor]:
        """As ``dict(module.named_buffers())``."""
        found = ((name, owner._buffers.get(local)) for name, owner, local in self.buffer_slots)
        return {name: b for name, b in found if b is not None}


def _slots(module: nn.Module, kind: str) -> tuple[tuple[str, nn.Module, str], ...]:
    """Where each tensor of ``named_parameters()``/``named_buffers()`` lives, in order."""
    seen: set[int] = set()
    slots = []
    for prefix, sub in module.named_modules():
        for local, tensor in getattr(sub, kind).items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            slots.append((f"{prefix}.{local}" if prefix else local, sub, local))
    return tuple(slots)


_walks: weakref.WeakKeyDictionary[nn.Module, Structure] = weakref.WeakKeyDictionary()


def structure(module: nn.Module) -> Structure:
    """``module``'s submodules and tensor slots, walked again only after a registration
    anywhere (see the module docstring)."""
    walk = _walks.get(module)
    if walk is None or walk.version != _version:
        walk = Structure(tuple(module.modules()), _slots(module, "_parameters"),
                         _slots(module, "_buffers"), _version)
        _walks[module] = walk
    return walk


__all__ = ["Structure", "structure"]

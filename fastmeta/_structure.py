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


Slot = tuple[dict[str, Any], str]  # an owner's ``_parameters`` or ``_buffers``, a key


@dataclass(frozen=True)
class Structure:
    """One walk of a module: its submodules, and where its parameters and buffers live.

    The slots are ``(qualified name, owner's _parameters or _buffers dict, local name)``;
    tensors are read from the owner when asked for, so a value assigned behind torch's back
    (a direct write to ``_parameters`` or ``_buffers``) is still the one used. The walked
    module itself is held weakly, so that a cached walk never keeps a model alive.
    """

    root: weakref.ref[nn.Module]
    submodules: tuple[nn.Module, ...]
    parameter_slots: tuple[tuple[str, dict[str, Any], str], ...]
    buffer_slots: tuple[tuple[str, dict[str, Any], str], ...]
    # every place that holds the tensor of each name: more than one for tied weights
    places: dict[str, tuple[Slot, ...]]
    # the other names of a tensor (tied weights, a submodule used twice): name -> first name
    aliases: dict[str, str]
    # a tensor that is a parameter in one place and a buffer in another
    mixed: bool
    version: int

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """As ``tuple(module.modules())``."""
        root = self.root()
        return self.submodules if root is None else (root, *self.submodules)

    def named_parameters(self) -> list[tuple[str, Tensor]]:
        """As ``module.named_parameters()``."""
        found = ((name, store.get(local)) for name, store, local in self.parameter_slots)
        return [(name, p) for name, p in found if p is not None]

    def named_buffers(self) -> dict[str, Tensor]:
        """As ``dict(module.named_buffers())``."""
        found = ((name, store.get(local)) for name, store, local in self.buffer_slots)
        return {name: b for name, b in found if b is not None}


def _walk(module: nn.Module) -> Structure:
    slots: dict[str, list[tuple[str, dict[str, Any], str]]] = {
        "_parameters": [], "_buffers": []}
    places: dict[str, list[Slot]] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    kind_of: dict[int, str] = {}
    mixed = False
    # every path to every submodule, a shared one under each of its names (torch's
    # named_parameters() reports each tensor once, under its first name: so do the slots)
    paths = list(module.named_modules(remove_duplicate=False))
    for kind in ("_parameters", "_buffers"):
        for prefix, sub in paths:
            store = getattr(sub, kind)
            for local, tensor in store.items():
                if tensor is None:
                    continue
                name = f"{prefix}.{local}" if prefix else local
                first = first_name.get(id(tensor))
                if first is None:
                    first = first_name[id(tensor)] = name
                    kind_of[id(tensor)] = kind
                    slots[kind].append((name, store, local))
                    places[name] = []
                elif kind_of[id(tensor)] != kind:
                    mixed = True
                elif name != first:
                    aliases[name] = first
                if not any(s is store and k == local for s, k in places[first]):
                    places[first].append((store, local))
    unique = list(dict.fromkeys(sub for _, sub in paths))  # as module.modules()
    return Structure(weakref.ref(module), tuple(unique[1:]),
                     tuple(slots["_parameters"]), tuple(slots["_buffers"]),
                     {name: tuple(where) for name, where in places.items()}, aliases, mixed,
                     _version)


_walks: weakref.WeakKeyDictionary[nn.Module, Structure] = weakref.WeakKeyDictionary()


def structure(module: nn.Module) -> Structure:
    """``module``'s submodules and tensor slots, walked again only after a registration
    anywhere (see the module docstring)."""
    walk = _walks.get(module)
    if walk is None or walk.version != _version:
        walk = _walks[module] = _walk(module)
    return walk


__all__ = ["Structure", "structure"]

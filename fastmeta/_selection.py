"""Choosing the parameters the inner loop adapts: ``adapt=`` of every learner.

A selection is a parameter name, a submodule name, a glob pattern over parameter names
(``"*.bias"``, ``"encoder.layer.*.attention.*"``), a submodule, a parameter, a predicate
``(name, parameter) -> bool``, or a list of these. It is matched by *identity*: a weight
shared by two modules (GPT-2's ``lm_head.weight`` is its token embedding) is selected by
either name or either module, and adapted once, under the name ``named_parameters()``
gives it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Union

from torch import Tensor, nn

Selection = Union[  # noqa: UP007 (a runtime alias; | of a str and a Callable fails on 3.10)
    str, nn.Module, Tensor, Callable[[str, Tensor], bool], Sequence["Selection"]
]


def _describe(entry: object) -> str:
    if isinstance(entry, nn.Module):
        return f"the module {type(entry).__name__}"
    if isinstance(entry, Tensor):
        return f"a tensor of shape {tuple(entry.shape)}"
    return repr(entry)


def _matches(model: nn.Module, entry: object, argument: str) -> set[int]:
    """Ids of the parameters ``entry`` selects (trainable or not)."""
    aliases = list(model.named_parameters(remove_duplicate=False))
    if isinstance(entry, str):
        modules = dict(model.named_modules(remove_duplicate=False))
        if entry in modules and entry:
            return {id(p) for p in modules[entry].parameters()}
        return {id(p) for name, p in aliases
                if name == entry or fnmatch.fnmatchcase(name, entry)}
    if isinstance(entry, nn.Module):
        if not any(entry is m for m in model.modules()):
            raise ValueError(
                f"{argument} holds {_describe(entry)}, which is not a submodule of the model; "
                f"pass model.<submodule> of the wrapped model itself"
            )
        return {id(p) for p in entry.parameters()}
    if isinstance(entry, Tensor):
        if not any(entry is p for _, p in aliases):
            raise ValueError(
                f"{argument} holds {_describe(entry)}, which is not a parameter of the model; "
                f"pass model.<name>.weight of the wrapped model itself"
            )
        return {id(entry)}
    if callable(entry):
        return {id(p) for name, p in aliases if entry(name, p)}
    raise TypeError(
        f"{argument} must be a parameter or submodule name, a glob pattern, a submodule, a "
        f"parameter, a predicate (name, parameter) -> bool, or a list of these; got "
        f"{type(entry).__name__}"
    )


def select_parameters(model: nn.Module, selection: Selection, *, argument: str = "adapt"
                      ) -> tuple[str, ...]:
    """Names (as in ``model.named_parameters()``) of the trainable parameters selected.

    What a learner's ``adapt=`` resolves to (``learner.adapted_names()``).

    Example:
        >>> fastmeta.select_parameters(model, "*.bias")   # BitFit: every bias
        ('net.0.bias', 'net.2.bias')

    Raises:
        ValueError: an entry matches no parameter, or only frozen ones
            (``requires_grad=False``), or is a module or tensor outside the model.
        TypeError: an entry of an unknown kind.
    """
    entries: Sequence[object] = (
        list(selection) if isinstance(selection, list | tuple) else [selection])
    if not entries:
        raise ValueError(f"{argument}=[] selects nothing; pass at least one name or module")
    chosen: set[int] = set()
    for entry in entries:
        ids = _matches(model, entry, argument)
        if not ids:
            every = [name for name, _ in model.named_parameters()]
            raise ValueError(
                f"{argument}={_describe(entry)} matches no parameter of the model; its "
                f"parameters are named like {every[:6]}"
                + (f" and {len(every) - 6} more" if len(every) > 6 else "")
                + ". Pass parameter or submodule names, glob patterns ('*.bias'), "
                "submodules, parameters or a predicate (name, parameter) -> bool"
            )
        chosen |= ids
    names = tuple(name for name, p in model.named_parameters()
                  if id(p) in chosen and p.requires_grad)
    if not names:
        frozen = [name for name, p in model.named_parameters() if id(p) in chosen]
        raise ValueError(
            f"{argument}={_describe(selection)} selects only parameters with "
            f"requires_grad=False ({frozen[:6]}); frozen parameters stay fixed in both loops. "
            f"Select trainable parameters, or set requires_grad=True on them"
        )
    return names


select = select_parameters

"""Inputs, targets and outputs as trees of tensors: a tensor, a tuple or a mapping, nested.

A model's inputs are a *tree*: a tensor (one positional argument), a tuple or list (several
positional arguments) or a mapping (keyword arguments), whose leaves are tensors; each leaf
of a batch is ``[tasks, shots, ...]``. These helpers index, slice and stack such trees with
``torch.utils._pytree`` (which ``torch.func.vmap`` uses too) and call a model on them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call

from ._structure import structure

# A tensor, or a tuple, list or mapping of trees; ``None`` only as a whole (no targets).
Tree = Any


def leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` in order (``None`` has none)."""
    if isinstance(tree, Tensor):  # the common case, without pytree's walk
        return [tree]
    return [leaf for leaf in pytree.tree_leaves(tree) if leaf is not None]


def tree_map(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """``tree`` with every leaf replaced by ``fn(leaf)`` (``None`` stays ``None``)."""
    if isinstance(tree, Tensor):  # the common case, without pytree's walk
        return fn(tree)
    return pytree.tree_map(lambda leaf: None if leaf is None else fn(leaf), tree)


def first_leaf(tree: Tree) -> Tensor:
    """The first tensor of ``tree`` (the one whose leading dims count tasks and shots)."""
    found = leaves(tree)
    if not found:
        raise ValueError("the inputs hold no tensor")
    return found[0]


def index(tree: Tree, i: Any) -> Tree:
    """``leaf[i]`` for every leaf: task ``i`` of a batch, or rows ``i`` of a task."""
    return tree_map(lambda leaf: leaf[i], tree)


def stack(trees: list[Tree]) -> Tree:
    """Trees of one structure stacked leaf by leaf into one tree of ``[len(trees), ...]``."""
    flat, spec = pytree.tree_flatten(trees[0])
    columns = [pytree.tree_flatten(tree)[0] for tree in trees]
    return pytree.tree_unflatten([torch.stack([c[i] for c in columns])
                                  for i in range(len(flat))], spec)


def zip_map(fn: Callable[..., Any], *trees: Tree) -> Tree:
    """``fn`` applied leaf by leaf to several trees of one structure."""
    flat, spec = pytree.tree_flatten(trees[0])
    others = [pytree.tree_flatten(tree)[0] for tree in trees[1:]]
    return pytree.tree_unflatten([fn(leaf, *(o[i] for o in others))
                                  for i, leaf in enumerate(flat)], spec)


def normalise(tree: Tree) -> Tree:
    """Mappings become plain dicts (a tokenizer's ``BatchEncoding`` too), lists stay lists,
    numpy arrays become tensors; other leaves are kept (validation names them)."""
    if isinstance(tree, Mapping):
        return {key: normalise(value) for key, value in tree.items()}
    if isinstance(tree, tuple) and not hasattr(tree, "_fields"):
        return tuple(normalise(value) for value in tree)
    if isinstance(tree, list):
        return [normalise(value) for value in tree]
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(tree)
    return tree


def is_tree_node(value: Any) -> bool:
    """A tuple, list or mapping (a container of model inputs), not a tensor."""
    return isinstance(value, Mapping | list) or (
        isinstance(value, tuple) and not hasattr(value, "_fields"))


def arguments(tree: Tree) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of a model call on ``tree``: a tuple or list is the positional
    arguments, a mapping the keyword arguments, anything else the one positional argument."""
    if isinstance(tree, Mapping):
        return (), dict(tree)
    if isinstance(tree, tuple | list):
        return tuple(tree), {}
    return (tree,), {}


def call(module: nn.Module, state: Any, tree: Tree) -> Any:
    """``functional_call(module, state, args, kwargs)`` with the arguments of ``tree``.

    ``state`` is a mapping of names to tensors, or a tuple of such mappings. The tensors
    are put in the module's own slots (found by its cached :func:`structure`) for the
    call and put back afterwards, as ``functional_call`` does, without its walk of the
    module on every call (about half its cost on a small model). A tensor known under
    several names (tied weights, a submodule used twice) is replaced everywhere it is
    used and put back everywhere afterwards (``functional_call`` leaves a submodule used
    twice holding the given tensor). ``functional_call`` itself runs where the cached
    walk cannot answer: a name it does not know, a name or a tensor given twice, a tensor
    that is a parameter in one place and a buffer in another, and while ``torch.compile``
    traces.
    """
    args, kwargs = arguments(tree)
    return call_with(module, state, args, kwargs)


def call_with(module: nn.Module, state: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> Any:
    """:func:`call` with the model's positional and keyword arguments given apart."""
    mapping = _single(state)
    if mapping is None or _is_compiling():
        return functional_call(module, state, args, kwargs)
    walk = structure(module)
    places, aliases = walk.places, walk.aliases
    targets = [aliases.get(name, name) for name in mapping] if aliases else list(mapping)
    if walk.mixed or any(target not in places for target in targets) or (
            aliases and len(set(targets)) < len(targets)):  # one tensor given twice
        return functional_call(module, state, args, kwargs)
    swapped: list[tuple[str, Any, dict[str, Any], str, Any]] = []
    try:
        for (name, value), target in zip(mapping.items(), targets):
            for store, local in places[target]:
                swapped.append((name, value, store, local, store.get(local, _MISSING)))
                store[local] = value
        return module(*args, **kwargs)
    finally:
        for name, value, store, local, original in reversed(swapped):
            now = store.get(local, _MISSING)
            if now is not value and now is not _MISSING and isinstance(state, dict):
                state[name] = now  # the forward assigned it anew: as functional_call does
            if original is _MISSING:
                store.pop(local, None)
            else:
                store[local] = original


_MISSING = object()


def _single(state: Any) -> Mapping[str, Any] | None:
    """``state`` as one mapping, or ``None`` where names repeat across its mappings."""
    if isinstance(state, Mapping):
        return state
    if isinstance(state, tuple) and all(isinstance(part, Mapping) for part in state):
        if len(state) == 1:
            return state[0]
        merged: dict[str, Any] = {}
        for part in state:
            merged.update(part)
        if len(merged) == sum(len(part) for part in state):
            return merged
    return None


def _dynamo_is_compiling() -> bool:
    """Whether ``torch.compile`` is tracing, before ``torch.compiler.is_compiling``."""
    import torch._dynamo

    return bool(torch._dynamo.is_compiling())


# looked up once: it is asked on every model call
_is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling",
                                            _dynamo_is_compiling)


def apply(fn: Callable[..., Any], tree: Tree) -> Any:
    """``fn`` called on the arguments of ``tree`` (see :func:`arguments`)."""
    args, kwargs = arguments(tree)
    return fn(*args, **kwargs)


def describe(tree: Tree) -> str:
    """Shapes of the leaves of ``tree``, for error messages: ``(4, 5, 3)`` or
    ``{'input_ids': (4, 5, 7), 'attention_mask': (4, 5, 7)}``."""
    if isinstance(tree, Tensor):
        return str(tuple(tree.shape))
    if isinstance(tree, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in tree.items()) + "}"
    if isinstance(tree, tuple | list):
        inner = ", ".join(describe(v) for v in tree)
        return f"({inner},)" if isinstance(tree, tuple) and len(tree) == 1 else (
            f"({inner})" if isinstance(tree, tuple) else f"[{inner}]")
    return type(tree).__name__

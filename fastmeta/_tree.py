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

# A tensor, or a tuple, list or mapping of trees; ``None`` only as a whole (no targets).
Tree = Any


def leaves(tree: Tree) -> list[Any]:
    """The leaves of ``tree`` in order (``None`` has none)."""
    return [leaf for leaf in pytree.tree_leaves(tree) if leaf is not None]


def tree_map(fn: Callable[[Any], Any], tree: Tree) -> Tree:
    """``tree`` with every leaf replaced by ``fn(leaf)`` (``None`` stays ``None``)."""
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
    """``functional_call(module, state, args, kwargs)`` with the arguments of ``tree``."""
    args, kwargs = arguments(tree)
    return functional_call(module, state, args, kwargs)


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

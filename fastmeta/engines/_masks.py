"""Hugging Face attention masks on the vectorised engine.

transformers prepares a model's attention mask with checks that read the mask's values:
where no token is masked (``padding_mask.all()`` in
``transformers.masking_utils._ignore_bidirectional_mask_sdpa`` and
``_ignore_causal_mask_sdpa``, ``torch.all(mask == 1)`` in the older
``modeling_attn_mask_utils``), it drops the mask, so that scaled-dot-product attention can
take a faster kernel (with ``is_causal`` for a decoder). Under ``vmap`` the mask holds one
task's values per batch entry, and a Python ``if`` on them is what torch.func refuses
("data-dependent control flow").

transformers already skips those checks for tensors whose values cannot be read: while
``torch.compile``, ``torch.jit`` or FX traces, or on fake tensors
(``transformers.utils.import_utils.is_tracing(tensor)``). :func:`vectorised_masks` makes that
test true also for the tensors torch.func wraps while the vectorised engine runs, so the
mask is always built explicitly. That is exact: the check only ever drops a mask that
masks nothing (or a causal mask that ``is_causal`` reproduces), so attention computes the
same values, with or without it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

# transformers' modules that guard a data-dependent mask check with ``is_tracing``.
MASK_MODULES = ("transformers.masking_utils", "transformers.modeling_attn_mask_utils")


def _wrapped_by_torch_func(tensor: Any) -> bool:
    """Whether ``tensor`` is one torch.func wraps (batched by ``vmap``, tracked by ``grad``)."""
    return isinstance(tensor, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _unreadable_too(original: Callable[..., bool]) -> Callable[..., bool]:
    def is_tracing(tensor: Any = None) -> bool:
        return bool(original(tensor)) or _wrapped_by_torch_func(tensor)

    is_tracing.__wrapped__ = original  # type: ignore[attr-defined]
    is_tracing.fastmeta_masks = True  # type: ignore[attr-defined]
    return is_tracing


def vectorised_masks() -> contextlib.AbstractContextManager[None]:
    """While inside, transformers builds every attention mask torch.func wraps explicitly
    (see :func:`_vectorised_masks`); nothing to do where transformers is not imported."""
    if not any(name in sys.modules for name in MASK_MODULES):
        return contextlib.nullcontext()
    return _vectorised_masks()


@contextlib.contextmanager
def _vectorised_masks() -> Iterator[None]:
    """While inside, transformers builds every attention mask torch.func wraps explicitly.

    Only modules already imported are touched (fastmeta never imports transformers), and
    each is restored on exit; nested uses leave the outer one in place.
    """
    patched: list[tuple[Any, Callable[..., bool]]] = []
    for name in MASK_MODULES:
        module = sys.modules.get(name)
        original = getattr(module, "is_tracing", None)
        if original is None or getattr(original, "fastmeta_masks", False):  # nested
            continue
        module.is_tracing = _unreadable_too(original)  # type: ignore[union-attr]
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.is_tracing = original

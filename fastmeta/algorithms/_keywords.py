"""Unknown keyword arguments to an algorithm's constructor, explained.

Python's own ``TypeError: __init__() got an unexpected keyword argument 'loss'`` names
neither the class nor the argument it should have been; this names both.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, TypeVar

# Spellings from other libraries and from habit, and fastmeta's name for each.
ALIASES = {"loss": "loss_fn", "criterion": "loss_fn", "lr": "inner_lr", "alpha": "inner_lr",
           "fast_lr": "inner_lr", "steps": "inner_steps", "num_steps": "inner_steps",
           "adaptation_steps": "inner_steps", "first_order_approx": "first_order"}

T = TypeVar("T", bound=type)


def suggestion(name: str, accepted: list[str]) -> str | None:
    """fastmeta's name for the keyword ``name``, or ``None`` when nothing is close."""
    alias = ALIASES.get(name)
    if alias in accepted:
        return alias
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    return close[0] if close else None


def explain_unknown_keywords(cls: T) -> T:
    """Make ``cls(...)`` with an unknown keyword raise a ``TypeError`` that names the fix."""
    init = cls.__init__  # type: ignore[misc]
    parameters = inspect.signature(init).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return cls
    accepted = [n for n, p in parameters.items() if n != "self" and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if name in accepted:
                continue
            fix = suggestion(name, accepted)
            hint = (f"did you mean {fix}={value!r}?" if fix is not None
                    else f"it takes {', '.join(accepted)}")
            raise TypeError(f"{cls.__name__} got an unexpected keyword argument "
                            f"{name}={value!r}; {hint}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls

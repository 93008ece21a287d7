"""Errors a user can act on, where torch's own text names no argument and no fix.

:func:`explained` wraps the public calls of a learner and rewrites the few torch errors
that reach users through their own code: an exception inside their ``loss_fn`` (with the
shapes it was called with, per task under ``vmap``), integer inputs reaching float layers,
and BatchNorm in train mode given one example. The other checks here run before
anything: a model on the meta device, and an outer learning rate that is not a finite
number. (A batch on the meta device is refused where batches are validated, in
``_task.py``.)
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import torch
from torch import Tensor, nn

from ._tree import Tree, describe, leaves


def refuse_meta_model(model: nn.Module) -> None:
    """A model whose parameters are on the meta device holds no numbers to meta-learn."""
    on_meta = [name for name, p in model.named_parameters() if p.is_meta]
    if on_meta:
        raise ValueError(
            f"model has parameters on the meta device ({on_meta[:3]}"
            f"{' and more' if len(on_meta) > 3 else ''}): they have shapes but no values. "
            f"Materialise it first: model.to_empty(device='cpu') and initialise it, or "
            f"model.load_state_dict(weights, assign=True)"
        )


def check_outer_lr(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an outer learning rate that would write NaN or inf into the meta-parameters."""
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, Tensor) and lr.numel() == 1 and lr.device.type == "cpu":
            lr = float(lr)
        if isinstance(lr, numbers.Real) and not (math.isfinite(lr) and float(lr) >= 0):
            raise ValueError(
                f"optimizer's learning rate lr={lr!r} (parameter group {index}) is not a "
                f"finite number >= 0: its first step would write {lr!r}-scaled updates into "
                f"every meta-parameter. Build it with a finite lr, e.g. "
                f"torch.optim.Adam(learner.parameters(), lr=1e-3) (a scheduler that "
                f"computed it may be at fault)"
            )


def non_finite_parameters(module: nn.Module) -> list[str]:
    """Names of the parameters holding NaN or inf."""
    return [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]


def _code_of(function: Callable[..., Any]) -> CodeType | None:
    while isinstance(function, functools.partial):
        function = function.func
    code = getattr(function, "__code__", None)
    if code is None and callable(function):
        code = getattr(type(function).__call__, "__code__", None)
    return code if isinstance(code, CodeType) else None


def _frame_running(error: BaseException, code: CodeType) -> FrameType | None:
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code is code:
            return traceback.tb_frame
        traceback = traceback.tb_next
    return None


def _shown(value: Any) -> str:
    try:
        if isinstance(value, Tensor):
            return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
        if isinstance(value, dict):
            return f"a {type(value).__name__} with keys {list(value.keys())}"
        return f"a {type(value).__name__} {describe(value)}"
    except Exception:  # a tensor of a finished vmap level has no shape left to show
        return f"a {type(value).__name__}"


def _with_message(error: BaseException, message: str) -> BaseException:
    try:
        return type(error)(message)
    except Exception:
        return RuntimeError(message)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _loss_error(error: BaseException, loss_fn: Any, engine: str) -> BaseException | None:
    code = _code_of(loss_fn)
    if code is None or os.path.abspath(code.co_filename).startswith(_PACKAGE):
        return None  # fastmeta's own losses explain themselves
    frame = _frame_running(error, code)
    if frame is None:
        return None
    names = code.co_varnames[:code.co_argcount]
    names = names[1:] if names[:1] == ("self",) else names
    args = [frame.f_locals.get(name) for name in names[:2]]
    if len(args) < 2:
        return None
    output, target = args
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    first = str(error).splitlines()[0] if str(error) else ""
    message = (f"loss_fn {name!r} raised {type(error).__name__} ({first}), called with "
               f"the model's output, {_shown(output)}, and the targets, {_shown(target)}")
    if isinstance(output, Tensor):
        per_task = engine == "vmap" or "vmap" in str(type(output))
        message += (
            ". Shapes are those of one task: [shots, ...]" + (
                " (engine='vmap' calls loss_fn once per task)" if per_task else "")
            + "; index the class dimension within the model's output size")
    else:
        message += (
            ". loss_fn gets the model's output as the model returns it: take the prediction "
            "out of it in loss_fn (e.g. out['logits']), or use "
            "fastmeta.Loss('cross_entropy', output_fn=lambda out: out['logits'])")
    return _with_message(error, message)


_DTYPE_MISMATCH = re.compile(
    r"must have the same dtype|expected scalar type|should be the same|"
    r"expected .*dtype|not implemented for '(Long|Int|Bool|Byte|Short|Char)'|"
    r"expected both vectors to have same dtype|Input type .* and weight type",
    re.IGNORECASE)
_ONE_VALUE = "Expected more than 1 value per channel when training"


def _raised_by_fastmeta(error: BaseException) -> bool:
    """Whether fastmeta raised ``error`` itself (its messages are its own): the innermost
    frame is fastmeta's, and not a torch-function mode passing a torch call on."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    code = traceback.tb_frame.f_code
    return (os.path.abspath(code.co_filename).startswith(_PACKAGE)
            and code.co_name != "__torch_function__")


def _inputs_error(error: BaseException, inputs: Tree | None,
                  model_dtype: torch.dtype) -> BaseException | None:
    if inputs is None or not _DTYPE_MISMATCH.search(str(error)) or _raised_by_fastmeta(error):
        return None
    found = [leaf for leaf in leaves(inputs) if isinstance(leaf, Tensor)
             and not (leaf.is_floating_point() or leaf.is_complex())]
    if not found:
        return None
    first = str(error).splitlines()[0]
    return TypeError(
        f"the inputs hold {found[0].dtype} values (shape {tuple(found[0].shape)}), but the "
        f"model computes in {model_dtype} ({type(error).__name__}: {first}). fastmeta casts "
        f"floating inputs to the model's dtype and leaves integer and bool ones as they are "
        f"(token ids for embeddings): convert features with x.float() (or "
        f"x.to({model_dtype}))"
    )


def _batch_norm_error(error: BaseException) -> BaseException | None:
    text = str(error)
    if _ONE_VALUE not in text or _raised_by_fastmeta(error):
        return None
    shape = text.split("got input size ")[-1].strip() if "got input size" in text else "?"
    return ValueError(
        f"a BatchNorm layer in train mode got one value per channel (input size {shape}): "
        f"in train mode it normalises each task's examples with their own statistics, so "
        f"a task's support and query sets need 2 or more examples. Use more shots, put the "
        f"BatchNorm layers in eval mode (model.eval(): running statistics), or use "
        f"GroupNorm or LayerNorm"
    )


@contextlib.contextmanager
def explained(learner: Any, inputs: Callable[[], Tree | None]) -> Iterator[None]:
    """Re-raise the torch errors above with what caused them and what to do.

    Args:
        learner: the learner that runs (its ``loss_fn``, ``engine`` and model dtype are
            read only on an error).
        inputs: gives the call's inputs, to name their dtype (only called on an error).
    """
    try:
        yield
    except (RuntimeError, TypeError, ValueError, IndexError, KeyError) as error:
        if getattr(error, "_fastmeta_explained", False):
            raise
        rewritten = (_loss_error(error, learner.loss_fn, str(learner.engine))
                     or _batch_norm_error(error))
        if rewritten is None:
            try:
                given = inputs()
                dtype = next(iter(learner.module.parameters())).dtype
            except Exception:
                raise error from None
            rewritten = _inputs_error(error, given, dtype)
        if rewritten is None:
            raise
        rewritten._fastmeta_explained = True  # type: ignore[attr-defined]
        raise rewritten from error

"""Layers whose torch kernels give wrong or missing meta-gradients, computed another way.

Measured on torch 2.13 (float64, against a per-task loop and finite differences):

- Under ``vmap`` with per-task weights, the batching rules of batch norm, layer norm and
  instance norm give wrong second-order gradients (relative errors from 1e-3 to far
  above 1), instance norm leaks gradient into a conv bias whose true gradient is 0, and
  embedding backward ignores ``padding_idx`` (the padding row gets gradient, first order
  too). Instance norm with running statistics is refused by its batching rule outright.
  What goes wrong in the normalisations is the per-task affine weight inside torch's
  kernels: the same kernels given no weight, with the weight and bias applied after them,
  are exact (float64, two second-order inner steps, against their definitions in a
  per-task loop), and cost less than the normalisations written out.
- On any engine, the CPU kernels of scaled-dot-product attention and of embedding bags,
  and ``torch.cdist`` and ``torch.pdist`` (the pairwise distances of metric heads such as
  prototypical networks'), have no second derivative ("derivative for ... is not
  implemented"), and the second
  derivative of ``torch._weight_norm`` (weight normalisation) is wrong (relative errors
  of 1e-3 after one inner step, 1e-1 after two, against finite differences).

While an engine runs, :func:`exact_layers` routes those functional calls (``F.batch_norm``,
``F.layer_norm``, ``F.instance_norm``, ``F.embedding``, ``F.embedding_bag``,
``torch._weight_norm``) to forms that differentiate correctly to any order under ``vmap``,
and selects the math kernel of scaled-dot-product attention for second-order
meta-gradients; ``torch.cdist`` and ``torch.pdist`` go to their definitions for
second-order meta-gradients of models that call them (:func:`cdist`). Outputs are
unchanged; running statistics are never updated (the model's buffers are never written, as
everywhere in fastmeta).

:func:`refused_layer` names the layers no engine can run exactly (an embedding with
``max_norm`` rewrites its weight in place on every forward), and
:func:`unvectorisable_layer` those ``vmap`` cannot run at all (fused recurrent kernels).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._structure import structure


def _channel_shape(input: Tensor) -> list[int]:
    return [1, -1] + [1] * (input.dim() - 2)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` without running-statistics updates, its affine part outside
    torch's kernel (see :func:`layer_norm`)."""
    shape = _channel_shape(input)
    if training or running_mean is None or running_var is None:
        output = F.batch_norm(input, None, None, None, None, True, 0.0, eps)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
        output = (input - mean) * torch.rsqrt(var + eps)
    return _affine(output, weight, bias, shape)


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.instance_norm`` without running-statistics updates, its affine part outside
    torch's kernel (see :func:`layer_norm`)."""
    shape = _channel_shape(input)
    if use_input_stats or running_mean is None or running_var is None:
        output = F.instance_norm(input, None, None, None, None, True, 0.0, eps)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
        output = (input - mean) * torch.rsqrt(var + eps)
    return _affine(output, weight, bias, shape)


def layer_norm(
    input: Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` with its affine part outside torch's kernel.

    Under ``vmap``, torch's layer-norm kernel is exact to second order as long as it gets
    no per-task weight: its batching rule goes wrong (relative errors above 1 in the
    input's second-order gradient, float64) only where the affine weight is batched. So
    the kernel normalises and the weight and bias are applied as plain products, which
    costs less than the whole normalisation written out.
    """
    output = F.layer_norm(input, normalized_shape, None, None, eps)
    if weight is not None:
        output = output * weight
    if bias is not None:
        output = output + bias
    return output


def _affine(output: Tensor, weight: Tensor | None, bias: Tensor | None,
            shape: list[int]) -> Tensor:
    if weight is not None:
        output = output * weight.view(shape)
    if bias is not None:
        output = output + bias.view(shape)
    return output


def _without_padding_gradient(weight: Tensor, padding_idx: int) -> Tensor:
    """``weight`` whose row ``padding_idx`` is a constant: it gets no gradient, of any order."""
    keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[padding_idx] = 0
    return weight * keep + (weight * (1 - keep)).detach()


def embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """``F.embedding`` whose padding row gets no gradient under ``vmap`` either."""
    if padding_idx is not None:
        weight = _without_padding_gradient(weight, padding_idx % weight.shape[0])
    return F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)


def embedding_bag(
    input: Tensor,
    weight: Tensor,
    offsets: Tensor | None = None,
    max_norm: float | None = None,
    norm_type: float = 2,
    scale_grad_by_freq: bool = False,
    mode: str = "mean",
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> Tensor:
    """``F.embedding_bag`` of fixed-length bags (2-D input) as embedding + reduction.

    Other forms (1-D input with ``offsets``) go to torch's kernel unchanged.
    """
    if input.dim() != 2 or offsets is not None or max_norm is not None:
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq,
                               mode, sparse, per_sample_weights, include_last_offset,
                               padding_idx)
    vectors = embedding(input, weight, padding_idx, None, norm_type, scale_grad_by_freq)
    present = torch.ones_like(input, dtype=weight.dtype)
    if padding_idx is not None:
        present = (input != padding_idx % weight.shape[0]).to(weight.dtype)
    if per_sample_weights is not None:
        vectors = vectors * per_sample_weights.unsqueeze(-1)
    vectors = vectors * present.unsqueeze(-1)
    if mode == "sum":
        return vectors.sum(-2)
    if mode == "mean":
        return vectors.sum(-2) / present.sum(-1, keepdim=True).clamp_min(1)
    empty = torch.finfo(weight.dtype).min
    masked = vectors.masked_fill(present.unsqueeze(-1) == 0, empty).amax(-2)
    return torch.where(present.sum(-1, keepdim=True) > 0, masked, torch.zeros_like(masked))


def _safe_root(total: Tensor, p: float) -> Tensor:
    """``total ** (1/p)`` whose gradients of every order are 0 where ``total`` is 0 (as
    torch's kernels define the gradient of a zero distance), not inf or nan."""
    positive = total > 0
    root = torch.where(positive, total, torch.ones_like(total)) ** (1.0 / p)
    return torch.where(positive, root, torch.zeros_like(root))


def _minkowski(difference: Tensor, p: float) -> Tensor:
    """The ``p``-norm over the last dimension of ``difference``, from its definition."""
    if p == 0:  # the count of differing coordinates: piecewise constant, no gradient
        return (difference != 0).to(difference.dtype).sum(-1)
    if math.isinf(p):
        return difference.abs().amax(-1)
    if p == 1:
        return difference.abs().sum(-1)
    if p == 2:
        return _safe_root((difference * difference).sum(-1), 2.0)
    return _safe_root((difference.abs() ** p).sum(-1), p)


def cdist(x1: Tensor, x2: Tensor, p: float = 2.0,
          compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> Tensor:
    """``torch.cdist`` from its definition, differentiable to any order.

    ``out[..., i, j] = ‖x1[..., i, :] − x2[..., j, :]‖_p``. torch's kernel has no second
    derivative (``_cdist_backward``); this form holds every coordinate difference at once
    (``[..., rows1, rows2, features]``), exact where the matrix-product form of large
    Euclidean inputs (``compute_mode``) loses digits to cancellation.
    """
    if p < 0:
        raise ValueError(f"cdist only supports non-negative p values, got p={p}")
    return _minkowski(x1.unsqueeze(-2) - x2.unsqueeze(-3), float(p))


def pdist(input: Tensor, p: float = 2.0) -> Tensor:
    """``torch.pdist`` (distances between the rows of ``input``, upper triangle, row-major)
    from its definition, differentiable to any order."""
    if p < 0:
        raise ValueError(f"pdist only supports non-negative p values, got p={p}")
    rows, columns = torch.triu_indices(input.shape[-2], input.shape[-2], offset=1,
                                       device=input.device)
    return _minkowski(input[..., rows, :] - input[..., columns, :], float(p))


# Routed for second-order meta-gradients of models seen calling them. Which models do is
# learned on their first second-order run (routed, and watched); a torch-function mode
# over every later call of a model that never calls them would cost 5-10% of a small
# model's meta-step for nothing.
_METRIC_ROUTES: dict[Callable[..., Any], Callable[..., Tensor]] = {
    torch.cdist: cdist,
    torch.pdist: pdist,
}
_CALLS_METRIC: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


class _ExactFunctions(torch.overrides.TorchFunctionMode):
    """Sends the functional calls in ``routes`` to their replacements (``used``: those
    that were called)."""

    def __init__(self, routes: dict[Callable[..., Any], Callable[..., Tensor]]) -> None:
        super().__init__()
        self.routes = routes
        self.used: set[Callable[..., Any]] = set()

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        route = self.routes.get(func)
        if route is None:
            return func(*args, **kwargs)
        self.used.add(func)
        return route(*args, **kwargs)


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` (``g * v / ‖v‖``, the norm over every dim but ``dim``)."""
    dims = [d for d in range(v.dim()) if d != dim % max(v.dim(), 1)] if dim != -1 else None
    return v * (g / torch.linalg.vector_norm(v, dim=dims, keepdim=dims is not None))


_VMAP_ROUTES: dict[type[nn.Module], dict[Callable[..., Any], Callable[..., Tensor]]] = {
    nn.modules.batchnorm._BatchNorm: {F.batch_norm: batch_norm},
    nn.modules.instancenorm._InstanceNorm: {F.instance_norm: instance_norm},
    nn.LayerNorm: {F.layer_norm: layer_norm},
    nn.Embedding: {F.embedding: embedding},
    nn.EmbeddingBag: {F.embedding_bag: embedding_bag},
}
# Modules made of layer norms (a model calling F.layer_norm itself is caught by the
# first-step check of engine="auto" instead).
_HOLDS_LAYER_NORM = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Transformer)


def _routes(module: nn.Module, *, vectorised: bool, second_order: bool
            ) -> dict[Callable[..., Any], Callable[..., Tensor]]:
    routes: dict[Callable[..., Any], Callable[..., Tensor]] = {}
    for sub in structure(module).modules:
        if vectorised:
            for kind, functions in _VMAP_ROUTES.items():
                if isinstance(sub, kind):
                    routes.update(functions)
            if isinstance(sub, _HOLDS_LAYER_NORM):
                routes[F.layer_norm] = layer_norm
        if second_order and isinstance(sub, nn.EmbeddingBag):
            routes[F.embedding_bag] = embedding_bag
        if second_order and _has_weight_norm(sub):
            routes[torch._weight_norm] = weight_norm
    return routes


def _has_weight_norm(module: nn.Module) -> bool:
    """``torch.nn.utils.parametrizations.weight_norm`` or the older hook-based form."""
    if type(module).__name__ == "_WeightNorm":
        return True
    return any(type(hook).__name__ == "WeightNorm" for hook in module._forward_pre_hooks.values())


# torch's notice that an op without a batching rule runs through vmap's per-example
# fallback: slower, but exact. It came several times per adapt() (forward and backward of
# every attention call); the engine's choice is explained by ``engine_decision`` instead.
FALLBACK_NOTICE = "There is a performance drop because we have not yet implemented the batching"


_quiet = threading.local()  # .depth: quiet_batching_fallbacks blocks open on this thread
# torch.func's switch for the notice (a C++ flag: setting it costs well under a
# microsecond, where a warnings filter costs tens per block and resets the warnings
# module's caches); torch has no getter, and its default is on.
_set_notice = getattr(getattr(torch._C, "_functorch", None), "_set_vmap_fallback_warning_enabled",
                      None)


@contextlib.contextmanager
def quiet_batching_fallbacks() -> Iterator[None]:
    """Run the block without torch's per-call notice about vmap's slow, exact fallback.

    The notice is switched off for the block and back on (torch's default) after the
    outermost one; where torch lacks the switch, a warnings filter hides it instead.
    """
    depth = getattr(_quiet, "depth", 0)
    _quiet.depth = depth + 1
    try:
        if depth:
            yield
        elif _set_notice is not None:
            _set_notice(False)
            try:
                yield
            finally:
                _set_notice(True)
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=FALLBACK_NOTICE, category=UserWarning)
                yield
    finally:
        _quiet.depth = depth


# module -> (its walk, {(vectorised, second_order): (routes, batch norms)}): what
# exact_layers finds in a model changes only with a registration (a new walk).
_LAYERS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, dict[tuple[bool, bool], Any]]] = (
    weakref.WeakKeyDictionary())


def _layers(module: nn.Module, *, vectorised: bool, second_order: bool
            ) -> tuple[dict[Callable[..., Any], Callable[..., Tensor]],
                       list[nn.modules.batchnorm._BatchNorm]]:
    """:func:`_routes` and the batch norms of ``module``, computed once per walk."""
    walk = structure(module)
    cached = _LAYERS.get(module)
    if cached is None or cached[0] is not walk:
        cached = _LAYERS[module] = (walk, {})
    key = (vectorised, second_order)
    if key not in cached[1]:
        norms = [m for m in walk.modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        cached[1][key] = (_routes(module, vectorised=vectorised, second_order=second_order),
                          norms)
    routes, norms = cached[1][key]
    return routes, norms


# (getter, setter, whether it is the math kernel) of each attention backend torch has.
_ATTENTION_BACKENDS = [
    (getattr(torch._C, f"_get_{name}_sdp_enabled"), getattr(torch._C, f"_set_sdp_use_{name}"),
     name == "math")
    for name in ("cudnn", "flash", "mem_efficient", "math", "overrideable")
    if hasattr(torch._C, f"_get_{name}_sdp_enabled") and hasattr(torch._C, f"_set_sdp_use_{name}")
]


class _MathAttention:
    """``sdpa_kernel(SDPBackend.MATH)`` (the attention kernel with a second derivative on
    every device) without its per-call argument handling: it runs on every meta-step."""

    def __enter__(self) -> None:
        self._saved = [get() for get, _, _ in _ATTENTION_BACKENDS]
        for _, set_enabled, is_math in _ATTENTION_BACKENDS:
            set_enabled(is_math)

    def __exit__(self, *exc: object) -> None:
        for (_, set_enabled, _), was in zip(_ATTENTION_BACKENDS, self._saved):
            set_enabled(was)


def exact_layers(module: nn.Module, *, vectorised: bool, second_order: bool
                 ) -> contextlib.AbstractContextManager[None]:
    """Run the block with the exact forms of the layers ``module`` holds.

    Args:
        module: the model the engine runs.
        vectorised: the block runs under ``vmap`` (normalisation and embedding layers are
            replaced, and BatchNorm skips its running-statistics update).
        second_order: the block is differentiated twice (attention uses the math kernel,
            fixed-length embedding bags become embedding + reduction, weight norm and
            pairwise distances are computed from their definitions).
    """
    routes, norms = _layers(module, vectorised=vectorised, second_order=second_order)
    watching = second_order and module not in _CALLS_METRIC
    if second_order and _CALLS_METRIC.get(module, True):
        routes = {**routes, **_METRIC_ROUTES}  # a copy: _layers' dict is cached
    switched: list[nn.modules.batchnorm._BatchNorm] = []
    if vectorised:  # in-place statistics updates (and their counter) cannot run under vmap
        switched = [m for m in norms if m.training and m.track_running_stats]
    if not routes and not switched:  # the common case, without a generator per call
        return _MathAttention() if second_order else contextlib.nullcontext()
    return _exact_layers(module, routes, switched, second_order=second_order,
                         watching=watching)


@contextlib.contextmanager
def _exact_layers(module: nn.Module, routes: dict[Callable[..., Any], Callable[..., Tensor]],
                  switched: list[nn.modules.batchnorm._BatchNorm], *, second_order: bool,
                  watching: bool) -> Iterator[None]:
    for m in switched:
        m.track_running_stats = False
    try:
        with contextlib.ExitStack() as stack:
            mode = stack.enter_context(_ExactFunctions(routes)) if routes else None
            if second_order:
                stack.enter_context(_MathAttention())
            yield
            if watching and mode is not None:
                _CALLS_METRIC[module] = bool(mode.used & set(_METRIC_ROUTES))
    finally:
        for m in switched:
            m.track_running_stats = True


def refused_layer(model: nn.Module) -> str | None:
    """Why no engine can meta-learn ``model`` exactly, or ``None``."""
    for name, sub in model.named_modules():
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.max_norm is not None:
            return (
                f"submodule {name!r} is a {type(sub).__name__} with max_norm={sub.max_norm}, "
                f"which rewrites its weight in place on every forward: meta-gradients through "
                f"it are undefined and adapt() could not leave the model untouched. Build it "
                f"with max_norm=None, or rescale the looked-up vectors in forward() without "
                f"writing to the weight"
            )
        if isinstance(sub, (nn.Embedding, nn.EmbeddingBag)) and sub.sparse:
            return (
                f"submodule {name!r} is a {type(sub).__name__} with sparse=True: sparse "
                f"gradients cannot be differentiated through an inner loop; build it with "
                f"sparse=False"
            )
    return None


def unvectorisable_layer(model: nn.Module) -> str | None:
    """Why ``vmap`` cannot run ``model`` over tasks, or ``None``."""
    for name, sub in model.named_modules():
        if isinstance(sub, (nn.RNNBase, nn.RNNCellBase)):
            return (
                f"submodule {name!r} is a {type(sub).__name__}, which torch.func cannot "
                f"vectorise over tasks (its fused kernel has no batching rule for per-task "
                f"weights)"
            )
    return None


_RANDOM = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
           F.feature_alpha_dropout)


class _NoRandomness(torch.overrides.TorchFunctionMode):
    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:  # (q, k, v, attn_mask, dropout_p, ...)
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            else:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)


def without_randomness() -> contextlib.AbstractContextManager[Any]:
    """Dropout (functional calls and attention dropout) becomes the identity in the block.

    Used where two engines must compute the same thing: their random masks differ.
    """
    return _NoRandomness()

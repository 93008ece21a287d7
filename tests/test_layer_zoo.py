"""Every engine against an independent per-task reference, over a zoo of ``torch.nn`` layers.

For each layer family (``tests/_zoo.py``) × algorithm × engine, in float64: the meta-gradient
that ``meta_step`` writes into ``.grad`` equals the reference written in ``_zoo.py`` within
1e-8 relative, or the engine refuses the model with an error naming the layer. The
references of the exact algorithms are themselves checked against finite differences.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastmeta
from tests._zoo import ZOO, draw_task, finite_difference_check, loss_of, reference_meta_gradient

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd")
ENGINES = ("vmap", "loop", "higher", "auto")
INNER_LR, STEPS = 0.1, 2


class _ReferenceForms(torch.overrides.TorchFunctionMode):
    """The reference's own embedding bag and Euclidean ``torch.cdist`` (torch's kernels
    have no second derivative) and weight norm (torch's second derivative of
    ``torch._weight_norm`` is wrong)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func is F.embedding_bag:
            ids, weight = args[0], args[1]
            assert kwargs.get("mode", "mean") == "mean" and ids.dim() == 2
            keep = (ids != kwargs["padding_idx"]).to(weight.dtype).unsqueeze(-1)
            return (weight[ids] * keep).sum(1) / keep.sum(1).clamp_min(1)
        if func is torch.cdist:
            x1, x2 = args
            assert kwargs.get("p", 2.0) == 2.0
            return ((x1[:, None, :] - x2[None, :, :]) ** 2).sum(-1).sqrt()
        if func is torch._weight_norm:
            v, g, dim = args
            assert dim == 0
            return g * v / (v * v).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()
        return func(*args, **kwargs)


def _rates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta-SGD rates that differ per element, so that a mix-up shows."""
    return {
        name: (INNER_LR + 0.02 * torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view_as(p))
        .requires_grad_()
        for name, p in model.named_parameters() if p.requires_grad
    }


@functools.cache
def _reference(name: str, algorithm: str) -> dict[str, torch.Tensor]:
    entry = ZOO[name]
    model = entry.build()
    lrs = _rates(model) if algorithm == "metasgd" else None
    with sdpa_kernel(SDPBackend.MATH), _ReferenceForms():
        _, grads = reference_meta_gradient(model, draw_task(entry), algorithm=algorithm,
                                           inner_lr=INNER_LR, steps=STEPS,
                                           loss=loss_of(entry), lrs=lrs)
    return grads


def _learner(name: str, algorithm: str, engine: str) -> fastmeta.MetaLearner:
    entry = ZOO[name]
    model = entry.build()
    options: dict[str, Any] = dict(inner_lr=INNER_LR, inner_steps=STEPS, engine=engine,
                                   loss_fn="cross_entropy" if entry.classes else "mse")
    cls = {"maml": fastmeta.MAML, "fomaml": fastmeta.FOMAML, "reptile": fastmeta.Reptile,
           "metasgd": fastmeta.MetaSGD}[algorithm]
    learner = cls(model, **options)
    if algorithm == "metasgd":
        with torch.no_grad():
            for param_name, rate in _rates(model).items():
                learner.inner_lrs[param_name.replace(".", "-")].copy_(rate)
    return learner


def _meta_gradient(learner: fastmeta.MetaLearner) -> dict[str, torch.Tensor]:
    grads = {n: p.grad for n, p in learner.module.named_parameters() if p.requires_grad}
    if isinstance(learner, fastmeta.MetaSGD):
        grads.update({f"lr:{n}": learner.inner_lrs[n.replace(".", "-")].grad for n in grads})
    return grads


CASES = [(name, algorithm, engine) for name in ZOO for algorithm in ALGORITHMS
         for engine in ENGINES]


@pytest.mark.parametrize("name,algorithm,engine", CASES, ids=["-".join(c) for c in CASES])
def test_meta_gradient_equals_the_per_task_reference(name, algorithm, engine):
    entry = ZOO[name]
    refusal = {"vmap": entry.vmap, "loop": entry.higher, "higher": entry.higher,
               "auto": entry.higher}[engine]
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            _learner(name, algorithm, engine)
        return
    expect_fallback = engine == "auto" and entry.vmap is not None
    with warnings.catch_warnings():
        if expect_fallback:
            warnings.filterwarnings("ignore", "engine='auto' uses the 'higher' engine")
        learner = _learner(name, algorithm, engine)
        learner.meta_step(draw_task(entry), torch.optim.SGD(learner.parameters(), lr=0.0))
    if engine == "auto":  # auto never settles for the slow engine where vmap is exact
        assert learner.engine == ("higher" if expect_fallback else "vmap")
    expected = _reference(name, algorithm)
    actual = _meta_gradient(learner)
    scale = max(float(g.abs().max()) for g in expected.values())
    for key, value in expected.items():
        got = actual[key] if actual[key] is not None else torch.zeros_like(value)
        torch.testing.assert_close(got, value, rtol=1e-8, atol=1e-8 * scale,
                                   msg=lambda m, key=key: f"{key}: {m}")


EXACT = [(name, algorithm) for name in ZOO for algorithm in ("maml", "metasgd")
         if not (ZOO[name].vmap and ZOO[name].higher)]


@pytest.mark.parametrize("name,algorithm", EXACT, ids=["-".join(c) for c in EXACT])
def test_reference_matches_finite_differences(name, algorithm):
    entry = ZOO[name]
    model = entry.build()
    task = draw_task(entry)
    lrs = _rates(model) if algorithm == "metasgd" else None

    def meta_loss() -> torch.Tensor:
        loss, _ = reference_meta_gradient(model, task, algorithm=algorithm, inner_lr=INNER_LR,
                                          steps=STEPS, loss=loss_of(entry), lrs=lrs)
        return loss

    with sdpa_kernel(SDPBackend.MATH), _ReferenceForms():
        error = finite_difference_check(model, task, _reference(name, algorithm), meta_loss)
    assert error < 1e-5, f"{name}/{algorithm}: finite differences differ by {error:.1e}"


def test_the_support_table_in_the_docs_lists_every_zoo_layer_as_tested():
    text = Path(__file__).parents[1].joinpath("docs", "engines.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([^`]+)` \|([^\n]*)$", text,
                                                         re.MULTILINE)}
    for name, entry in ZOO.items():
        assert name in rows, f"docs/engines.md has no row for the zoo entry {name!r}"
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[0].startswith("refused" if entry.vmap else "exact"), (name, cells)
        assert cells[1].startswith("refused" if entry.higher else "exact"), (name, cells)

"""Metric heads (``torch.cdist``, ``torch.pdist``) meta-learned to second order, in float64.

torch's kernels for both have no second derivative; the engines compute them from their
definitions. Checked against torch's values and first derivatives, against finite
differences (``gradgradcheck``), and as a whole second-order meta-gradient on the default
engine against finite differences of the meta-loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import fastmeta
from fastmeta.engines import _exact


def _points(*shape: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


P_VALUES = [1.0, 2.0, 3.0, math.inf]


@pytest.mark.parametrize("p", P_VALUES, ids=lambda p: f"p={p}")
def test_cdist_equals_torch_and_differentiates_twice(p):
    x1, x2 = _points(2, 4, 3), _points(2, 5, 3, seed=1)
    exact = _exact.cdist(x1, x2, p=p)
    torch.testing.assert_close(exact, torch.cdist(x1, x2, p=p), rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(exact.sum(), (x1, x2)),
                            torch.autograd.grad(torch.cdist(x1, x2, p=p).sum(), (x1, x2))):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda a, b: _exact.cdist(a, b, p=p), (x1, x2))


@pytest.mark.parametrize("p", P_VALUES, ids=lambda p: f"p={p}")
def test_pdist_equals_torch_and_differentiates_twice(p):
    x = _points(5, 3)
    torch.testing.assert_close(_exact.pdist(x, p=p), torch.pdist(x, p=p), rtol=1e-12,
                               atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda a: _exact.pdist(a, p=p), (x,))


def test_a_zero_distance_has_torchs_zero_gradient_of_every_order():
    x1 = _points(3, 2)
    x2 = x1.detach().clone().requires_grad_()  # row i of x1 equals row i of x2
    ours = torch.autograd.grad(_exact.cdist(x1, x2).sum(), x1, create_graph=True)[0]
    theirs = torch.autograd.grad(torch.cdist(x1, x2).sum(), x1)[0]
    torch.testing.assert_close(ours, theirs)
    second = torch.autograd.grad(ours.sum(), x1)[0]
    assert torch.isfinite(second).all()


def test_negative_p_is_refused_like_torch():
    with pytest.raises(ValueError, match="cdist only supports non-negative p values, got p=-1"):
        _exact.cdist(_points(2, 2), _points(2, 2), p=-1)


class PrototypeHead(nn.Module):
    """Class scores: minus the distances from the embedding to learned prototypes, plus a
    spread term over the prototypes (``torch.pdist``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 3)
        self.prototypes = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor) -> Tensor:
        spread = torch.pdist(self.prototypes).mean()
        return -torch.cdist(torch.tanh(self.body(x)), self.prototypes) + spread


def _task(seed: int = 0) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 6), generator=g)
    return fastmeta.TaskBatch(x[:, :3], labels[:, :3], x[:, 3:], labels[:, 3:])


def test_metric_head_second_order_meta_gradient_equals_finite_differences():
    torch.manual_seed(0)
    learner = fastmeta.MAML(PrototypeHead().double(), inner_lr=0.3, inner_steps=2,
                            loss_fn="cross_entropy")  # the default engine
    learner.meta_step(_task(), torch.optim.SGD(learner.parameters(), lr=0.0))
    assert learner.engine in ("vmap", "loop", "higher")
    report = fastmeta.gradcheck(learner, _task(), max_elements=12)
    assert report.ok, str(report)


def test_without_the_route_torch_refuses_the_second_derivative():
    x1, x2 = _points(3, 2), _points(4, 2, seed=1)
    gradient = torch.autograd.grad(torch.cdist(x1, x2).sum(), x1, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="_cdist_backward"):
        gradient.sum().backward()


def test_models_that_never_call_a_distance_skip_the_routing_after_their_first_run():
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    with _exact.exact_layers(model, vectorised=False, second_order=True):
        model(torch.randn(3, 1, dtype=torch.float64))
    assert _exact._CALLS_METRIC[model] is False
    head = PrototypeHead().double()
    with _exact.exact_layers(head, vectorised=False, second_order=True):
        head(torch.randn(3, 2, dtype=torch.float64))
    assert _exact._CALLS_METRIC[head] is True
    with _exact.exact_layers(model, vectorised=False, second_order=True):
        assert not torch.overrides._get_current_function_mode_stack()  # no mode at all

"""iMAML on linear regression, whose proximal inner problem has a closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.algorithms.imaml import conjugate_gradient
from tests.conftest import make_task

LAM, DIM = 2.0, 3


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM, 1, bias=False).double()


def _task() -> fastmeta.TaskBatch:
    return make_task(tasks=3, shots=6, query=5, x_shape=(DIM,), dtype=torch.float64, seed=4)


def _proximal_solution(theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """argmin_φ mean((xφᵀ − y)²) + lam/2 ‖φ − θ‖², solved exactly."""
    hessian = 2 * x.T @ x / x.shape[0]
    rhs = 2 * x.T @ y / x.shape[0] + LAM * theta.T
    return torch.linalg.solve(hessian + LAM * torch.eye(DIM, dtype=x.dtype), rhs).T


def _query_loss(phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ phi.T - y) ** 2).mean()


def _exact_meta_gradient(theta: torch.Tensor, task: fastmeta.TaskBatch) -> torch.Tensor:
    """mean_t (I + H_t/lam)⁻¹ ∇L_query(φ*_t), with the linear system solved directly."""
    total = torch.zeros_like(theta)
    for t in range(task.num_tasks):
        x, y = task.support_x[t], task.support_y[t]
        phi = _proximal_solution(theta, x, y).requires_grad_()
        (grad,) = torch.autograd.grad(_query_loss(phi, task.query_x[t], task.query_y[t]), phi)
        system = torch.eye(DIM, dtype=x.dtype) + (2 * x.T @ x / x.shape[0]) / LAM
        total += torch.linalg.solve(system, grad.T).T / task.num_tasks
    return total


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_meta_gradient_equals_the_exact_implicit_gradient(engine):
    model, task = _linear(), _task()
    learner = fastmeta.IMAML(model, inner_lr=0.1, inner_steps=300, lam=LAM, cg_steps=DIM,
                             engine=engine)
    result = learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    expected = _exact_meta_gradient(model.weight.detach(), task)
    torch.testing.assert_close(model.weight.grad, expected, rtol=1e-9, atol=1e-12)
    assert result.support_losses.shape == (3, 300)


def test_meta_gradient_matches_finite_differences_of_the_proximal_solution():
    model, task = _linear(), _task()
    learner = fastmeta.IMAML(model, inner_lr=0.1, inner_steps=300, lam=LAM, cg_steps=20)
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))

    def meta_loss(theta: torch.Tensor) -> float:
        return sum(float(_query_loss(_proximal_solution(theta, task.support_x[t],
                                                        task.support_y[t]),
                                     task.query_x[t], task.query_y[t]))
                   for t in range(task.num_tasks)) / task.num_tasks

    theta, eps = model.weight.detach().clone(), 1e-6
    for i in range(DIM):
        step = torch.zeros_like(theta)
        step[0, i] = eps
        numeric = (meta_loss(theta + step) - meta_loss(theta - step)) / (2 * eps)
        assert float(model.weight.grad[0, i]) == pytest.approx(numeric, rel=1e-6, abs=1e-9)


def test_unconverged_inner_loops_and_few_cg_steps_only_approximate_it():
    model, task = _linear(), _task()
    learner = fastmeta.IMAML(model, inner_lr=0.1, inner_steps=2, lam=LAM, cg_steps=1)
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    expected = _exact_meta_gradient(model.weight.detach(), task)
    assert not torch.allclose(model.weight.grad, expected, rtol=1e-3)


def test_conjugate_gradient_solves_a_positive_definite_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    matrix = a @ a.T + 5 * torch.eye(5, dtype=torch.float64)
    rhs = torch.randn(5, generator=g, dtype=torch.float64)
    (solution,) = conjugate_gradient(lambda v: [matrix @ v[0]], [rhs], steps=5,
                                     tolerance=0.0)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs))


def test_the_inner_loop_keeps_no_graph():
    model = _linear()
    learner = fastmeta.IMAML(model, inner_lr=0.1, inner_steps=5, lam=LAM)
    adaptation = learner._engine.adapt(model, _task(), learner.inner_loop(_task(), 5))
    assert all(not p.requires_grad for p in adaptation.params.values())


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="lam must be a number > 0"):
        fastmeta.IMAML(_linear(), inner_lr=0.1, inner_steps=5, lam=0.0)
    with pytest.raises(ValueError, match="cg_steps must be >= 1"):
        fastmeta.IMAML(_linear(), inner_lr=0.1, inner_steps=5, lam=1.0, cg_steps=0)
    with pytest.raises(TypeError, match="IMAML has no differentiable meta-loss"):
        fastmeta.IMAML(_linear(), inner_lr=0.1, inner_steps=5, lam=1.0).meta_loss(_task())

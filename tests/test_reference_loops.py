"""Every algorithm against a hand-unrolled loop over explicit tensors (no library)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastmeta
from tests.conftest import make_task, tiny_mlp


def forward(x, w):
    """The tiny MLP of conftest, written out: 1-8-8-1 with tanh."""
    h = torch.tanh(F.linear(x, w[0], w[1]))
    h = torch.tanh(F.linear(h, w[2], w[3]))
    return F.linear(h, w[4], w[5])


def unrolled(weights, task, rates, steps, *, second_order=True, adapt=range(6)):
    """Mean query loss after ``steps`` SGD steps per task, ``φ ← φ − rate ∘ ∇L``."""
    adapt = list(adapt)
    total = 0
    for t in range(task.num_tasks):
        fast = list(weights)
        for _ in range(steps):
            loss = F.mse_loss(forward(task.support_x[t], fast), task.support_y[t])
            grads = torch.autograd.grad(loss, [fast[i] for i in adapt], create_graph=second_order)
            for i, g in zip(adapt, grads):
                fast[i] = fast[i] - rates[i] * g
        total = total + F.mse_loss(forward(task.query_x[t], fast), task.query_y[t])
    return total / task.num_tasks


def library_grads(learner, task):
    """The gradients meta_step wrote (the outer SGD has lr 0, so nothing moves)."""
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    return [p.grad for p in learner.parameters()]


def weights_of(model):
    return [p.detach().clone().requires_grad_() for p in model.parameters()]


def test_maml_second_order_equals_unrolled_loop():
    task, model = make_task(dtype=torch.float64), tiny_mlp()
    weights = weights_of(model)
    expected = torch.autograd.grad(unrolled(weights, task, [0.1] * 6, steps=3), weights)
    got = library_grads(fastmeta.MAML(model, inner_lr=0.1, inner_steps=3), task)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_fomaml_equals_unrolled_loop_without_second_derivatives():
    task, model = make_task(dtype=torch.float64), tiny_mlp()
    weights = weights_of(model)
    loss = unrolled(weights, task, [0.1] * 6, steps=2, second_order=False)
    expected = torch.autograd.grad(loss, weights)
    got = library_grads(fastmeta.FOMAML(model, inner_lr=0.1, inner_steps=2), task)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_fomaml_gradient_is_query_gradient_at_adapted_weights():
    task, model = make_task(tasks=1, dtype=torch.float64), tiny_mlp()
    learner = fastmeta.FOMAML(model, inner_lr=0.1, inner_steps=2)
    adapted = learner.adapt(task.support_x[0], task.support_y[0])
    phi = [adapted.params[n].clone().requires_grad_() for n, _ in model.named_parameters()]
    expected = torch.autograd.grad(F.mse_loss(forward(task.query_x[0], phi), task.query_y[0]), phi)
    for e, g in zip(expected, library_grads(learner, task)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_reptile_one_step_pseudo_gradient_is_inner_lr_times_support_gradient():
    task, model = make_task(dtype=torch.float64), tiny_mlp()
    weights = weights_of(model)
    expected = [torch.zeros_like(w) for w in weights]
    for t in range(task.num_tasks):
        loss = F.mse_loss(forward(task.support_x[t], weights), task.support_y[t])
        for acc, g in zip(expected, torch.autograd.grad(loss, weights)):
            acc += 0.1 * g / task.num_tasks
    got = library_grads(fastmeta.Reptile(model, inner_lr=0.1, inner_steps=1), task)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_reptile_several_steps_equals_unrolled_loop_and_outer_sgd_is_classic_reptile():
    task, model = make_task(dtype=torch.float64), tiny_mlp()
    weights = [p.detach().clone() for p in model.parameters()]
    final = [torch.zeros_like(w) for w in weights]
    for t in range(task.num_tasks):
        fast = [w.clone().requires_grad_() for w in weights]
        for _ in range(3):
            loss = F.mse_loss(forward(task.support_x[t], fast), task.support_y[t])
            grads = torch.autograd.grad(loss, fast)
            fast = [(f - 0.1 * g).detach().requires_grad_() for f, g in zip(fast, grads)]
        for acc, f in zip(final, fast):
            acc += f.detach() / task.num_tasks
    learner = fastmeta.Reptile(model, inner_lr=0.1, inner_steps=3)
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.5))
    for w, f, p in zip(weights, final, model.parameters()):
        torch.testing.assert_close(p.grad, w - f, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.detach(), w + 0.5 * (f - w), rtol=1e-10, atol=1e-12)


def test_reptile_minibatches_cover_each_support_set_once_per_pass():
    learner = fastmeta.Reptile(tiny_mlp(), inner_lr=0.1, inner_steps=4, inner_batch_size=2)
    indices = learner.support_schedule(make_task(shots=4), steps=4)
    assert indices.shape == (3, 4, 2)
    for rows in indices:
        assert sorted(rows[:2].flatten().tolist()) == [0, 1, 2, 3]
        assert sorted(rows[2:].flatten().tolist()) == [0, 1, 2, 3]


def test_meta_sgd_with_equal_rates_gives_maml_gradient():
    task = make_task(dtype=torch.float64)
    maml = library_grads(fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2), task)
    meta_sgd = fastmeta.MetaSGD(tiny_mlp(), inner_lr=0.1, inner_steps=2)
    got = library_grads(meta_sgd, task)
    for e, g in zip(maml, got[:6]):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert len(got) == 12  # six weights, six rate tensors


def test_meta_sgd_rates_get_the_unrolled_gradient():
    task, model = make_task(dtype=torch.float64), tiny_mlp()
    weights = weights_of(model)
    learner = fastmeta.MetaSGD(model, inner_lr=0.1, inner_steps=2)
    with torch.no_grad():
        for rate in learner.inner_lrs.values():
            rate.uniform_(0.05, 0.2)
    rates = [r.detach().clone().requires_grad_() for r in learner.inner_lrs.values()]
    expected = torch.autograd.grad(unrolled(weights, task, rates, steps=2), weights + rates)
    for e, g in zip(expected, library_grads(learner, task)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_anil_equals_unrolled_loop_adapting_the_head_only():
    task, model = make_task(dtype=torch.float64), tiny_mlp()
    weights = weights_of(model)
    loss = unrolled(weights, task, [0.1] * 6, steps=2, adapt=[4, 5])
    expected = torch.autograd.grad(loss, weights)
    got = library_grads(fastmeta.ANIL(model, head="4", inner_lr=0.1, inner_steps=2), task)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    adapted = fastmeta.ANIL(model, head="4", inner_lr=0.1).adapt(task.support_x[0],
                                                                 task.support_y[0])
    assert torch.equal(adapted.params["0.weight"], model[0].weight.detach())
    assert not torch.equal(adapted.params["4.weight"], model[4].weight.detach())

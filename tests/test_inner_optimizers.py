"""Inner optimisers follow torch.optim step for step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastmeta
from tests.conftest import make_task, tiny_mlp

CASES = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("adam", {}),
    ("adam", {"betas": (0.8, 0.99), "eps": 1e-3, "weight_decay": 0.1}),
    ("adam", {"amsgrad": True}),
    ("adamw", {}),
    ("adamw", {"weight_decay": 0.1, "amsgrad": True}),
]


def torch_trajectory(model, name, kwargs, x, y, lr, steps):
    model = copy.deepcopy(model)
    optimizer = fastmeta.INNER_OPTIMIZERS[name](model.parameters(), lr=lr, **kwargs)
    trajectory = []
    for _ in range(steps):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{sorted(k)}" for n, k in CASES])
@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_adapt_follows_torch_optim_step_for_step(name, kwargs, dtype, tol, engine):
    """Both engines run fastmeta's rule (higher's own Adam follows an outdated formula)."""
    model = tiny_mlp(dtype=dtype)
    task = make_task(tasks=1, shots=6, dtype=dtype)
    x, y = task.support_x[0], task.support_y[0]
    expected = torch_trajectory(model, name, kwargs, x, y, lr=0.05, steps=5)
    learner = fastmeta.MAML(model, inner_lr=0.05, inner_optimizer=name,
                            inner_optimizer_kwargs=kwargs, engine=engine)
    for steps in (1, 5):
        adapted = learner.adapt(x, y, steps=steps)
        for e, g in zip(expected[steps - 1], adapted.params.values()):
            torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def test_optimizer_class_and_name_are_equivalent():
    model, task = tiny_mlp(), make_task(tasks=1, dtype=torch.float64)
    by_name = fastmeta.MAML(model, inner_lr=0.1, inner_optimizer="adamw")
    by_class = fastmeta.MAML(model, inner_lr=0.1, inner_optimizer=torch.optim.AdamW)
    a = by_name.adapt(task.support_x[0], task.support_y[0], steps=3)
    b = by_class.adapt(task.support_x[0], task.support_y[0], steps=3)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)


def test_optimizer_only_higher_knows_still_runs():
    with pytest.warns(UserWarning, match="engine='auto' uses the 'higher' engine: "
                      "inner_optimizer='rmsprop' has no functional rule"):
        learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_optimizer="rmsprop")
    assert learner.engine == "higher"
    result = learner.meta_step(make_task(dtype=torch.float64),
                               torch.optim.Adam(learner.parameters(), 1e-3))
    assert torch.isfinite(torch.tensor(result.loss))


def test_second_order_adam_survives_exactly_zero_gradients():
    """A weight whose gradient is exactly 0 must not turn the meta-gradient into NaN."""
    model = tiny_mlp()
    with torch.no_grad():
        model[2].weight[0].zero_()  # unit 0 of layer 2 is dead: its outgoing weight has
        model[4].weight[:, 0] = 0  # zero gradient, so Adam's second moment stays 0 there
    learner = fastmeta.MAML(model, inner_lr=0.01, inner_steps=3, inner_optimizer="adam")
    learner.meta_step(make_task(dtype=torch.float64), torch.optim.SGD(learner.parameters(), 0.0))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

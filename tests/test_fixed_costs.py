"""The per-step fixed costs removed from meta_step stay correct: cached module walks,
the cached optimiser check and the fused finiteness check."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.engines._structure import structure
from tests.conftest import make_task


def _names(module: nn.Module) -> list[str]:
    return [n for n, _ in structure(module).named_parameters()]


def test_walk_matches_torch_and_is_reused():
    model = fastmeta.models.Conv4(in_channels=1, num_classes=3, hidden=4, image_size=8)
    walk = structure(model)
    assert structure(model) is walk
    assert _names(model) == [n for n, _ in model.named_parameters()]
    assert all(a is b for (_, a), (_, b) in zip(walk.named_parameters(),
                                                model.named_parameters()))
    assert list(walk.named_buffers()) == [n for n, _ in model.named_buffers()]
    assert list(walk.modules) == list(model.modules())


def test_walk_follows_new_submodules_parameters_and_tied_weights():
    model = nn.Sequential(nn.Linear(2, 2))
    assert _names(model) == ["0.weight", "0.bias"]
    model.append(nn.Linear(2, 2))
    assert _names(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model[1].weight = model[0].weight  # tied: reported once, as torch does
    assert _names(model) == [n for n, _ in model.named_parameters()]
    model[0].scale = nn.Parameter(torch.ones(()))
    assert _names(model) == [n for n, _ in model.named_parameters()]


def test_tensors_are_read_when_used_not_when_walked():
    norm = nn.BatchNorm1d(2)
    walk = structure(norm)
    fresh = torch.full((2,), 3.0)
    norm._buffers["running_mean"] = fresh  # behind torch's back: no registration hook
    assert structure(norm).named_buffers()["running_mean"] is fresh
    weight = nn.Parameter(torch.zeros(2))
    norm._parameters["weight"] = weight
    assert dict(structure(norm).named_parameters())["weight"] is weight
    assert structure(norm) is walk


def test_requires_grad_is_read_at_every_step():
    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1))
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    assert learner.adapted_names() == ("0.weight", "0.bias", "1.weight", "1.bias")
    model[0].requires_grad_(False)
    assert learner.adapted_names() == ("1.weight", "1.bias")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.meta_step(make_task(tasks=2), optimizer)
    assert model[0].weight.grad is None and model[1].weight.grad is not None


def test_optimizer_check_runs_again_when_its_groups_change():
    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1))
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"does not hold the meta-parameters \['module.1.weight'"):
        learner.meta_step(make_task(tasks=2), optimizer)
    optimizer.add_param_group({"params": list(model[1].parameters())})
    learner._warned_optimizer = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.meta_step(make_task(tasks=2), optimizer)  # now complete: no warning
    with pytest.raises(ValueError, match="holds none of the learner's meta-parameters"):
        learner.meta_step(make_task(tasks=2), torch.optim.SGD([nn.Parameter(torch.ones(1))],
                                                              lr=0.1))


class _Huge(nn.Module):
    """Finite gradients whose fused sum overflows float32."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((1,), 0.5))
        self.b = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.a * 1e38 + self.b * 1e38)  # loss 1e38, gradients 1e38 each


def test_finite_but_huge_gradients_are_not_called_divergent():
    learner = fastmeta.FOMAML(_Huge(), inner_lr=1e-80, engine="vmap",
                              loss_fn=lambda out, y: out.mean())
    task = fastmeta.TaskBatch(*(torch.full((1, 2, 1), 1.0) for _ in range(4)))
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    grads = [p.grad for p in learner.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(sum(g.abs().max() for g in grads) + 2e38) == float("inf")  # sum overflows


def test_a_non_finite_gradient_is_still_found_and_named():
    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.v = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.v + torch.sqrt(self.w.abs()) * 0

    learner = fastmeta.FOMAML(Sqrt(), inner_lr=0.1, engine="vmap", loss_fn="mse",
                              adapt=["v"])  # NaN only in the outer gradient of w
    with pytest.raises(fastmeta.DivergenceError, match=r"meta-gradient of \['module.w'\]"):
        learner.meta_step(make_task(tasks=2),
                          torch.optim.SGD(learner.parameters(), lr=0.1))


def test_optimizer_check_runs_again_when_the_learners_parameters_change():
    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1))
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.meta_step(make_task(tasks=2), optimizer)  # complete: checked, no warning
    model[1].bias = nn.Parameter(torch.zeros(1))  # a new parameter the optimiser lacks
    with pytest.warns(UserWarning, match=r"does not hold the meta-parameters \['module.1.bias'"):
        learner.meta_step(make_task(tasks=2), optimizer)

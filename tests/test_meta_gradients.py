"""Meta-gradients against finite differences in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta
from tests.conftest import make_task, tiny_mlp


class _LibraryMetaLoss(torch.autograd.Function):
    """The learner's meta-loss as a function of the initial parameters.

    forward: copy the inputs into the model and evaluate ``learner.meta_loss``;
    backward: the learner's own meta-gradient. ``torch.autograd.gradcheck`` then compares
    that meta-gradient with finite differences of the meta-loss.
    """

    @staticmethod
    def forward(ctx, learner, task, *values):  # type: ignore[no-untyped-def]
        params = [p for p in learner.parameters() if p.requires_grad]
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)
        with torch.enable_grad():
            loss = learner.meta_loss(task)
            ctx.grads = torch.autograd.grad(loss, params)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def]
        return (None, None, *(grad_output * g for g in ctx.grads))


def _gradcheck(learner: fastmeta.MetaLearner, task: fastmeta.TaskBatch) -> bool:
    values = [p.detach().clone().requires_grad_() for p in learner.parameters() if p.requires_grad]
    return torch.autograd.gradcheck(
        lambda *v: _LibraryMetaLoss.apply(learner, task, *v), values, eps=1e-6, atol=1e-7,
        rtol=1e-5,
    )


def test_maml_second_order_two_steps_matches_finite_differences(task64):
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2)
    assert _gradcheck(learner, task64)


@pytest.mark.parametrize("inner_optimizer,kwargs", [
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {}),
    ("adamw", {"amsgrad": True}),
], ids=["sgd-nesterov", "adam", "adamw-amsgrad"])
def test_maml_through_inner_optimizers_matches_finite_differences(task64, inner_optimizer, kwargs):
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.05, inner_steps=2,
                            inner_optimizer=inner_optimizer, inner_optimizer_kwargs=kwargs)
    assert _gradcheck(learner, task64)


def test_meta_sgd_rates_and_weights_match_finite_differences(task64):
    learner = fastmeta.MetaSGD(tiny_mlp(), inner_lr=0.1, inner_steps=2)
    with torch.no_grad():  # unequal rates, so a mix-up between them would show
        for rate in learner.inner_lrs.values():
            rate.uniform_(0.05, 0.2)
    assert _gradcheck(learner, task64)


def test_anil_matches_finite_differences(task64):
    model = tiny_mlp()
    learner = fastmeta.ANIL(model, head="4", inner_lr=0.1, inner_steps=2)
    assert _gradcheck(learner, task64)


def test_gradcheck_helper_reports_ok_and_keeps_model_dtype():
    model = tiny_mlp(dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=2)
    report = fastmeta.gradcheck(learner, make_task())
    assert report.ok, str(report)
    assert set(report.errors) == {n for n, _ in learner.named_parameters()}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert "OK" in str(report)


class _WrongGradient(torch.autograd.Function):
    """MSE whose backward is off by a factor 2: gradcheck must catch it."""

    generate_vmap_rule = True  # usable under torch.func (the vectorised engine)

    @staticmethod
    def forward(prediction, target):  # type: ignore[no-untyped-def]
        return ((prediction - target) ** 2).mean()

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def]
        prediction, target = ctx.saved_tensors
        return grad_output * 4 * (prediction - target) / prediction.numel(), None


@pytest.mark.parametrize("engine", ["higher", "vmap"])
def test_gradcheck_helper_detects_a_wrong_gradient(engine):
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, loss_fn=_WrongGradient.apply, engine=engine)
    report = fastmeta.gradcheck(learner, make_task(), max_elements=3)
    assert not report.ok
    assert "MISMATCH" in str(report)


@pytest.mark.parametrize("make", [
    lambda m: fastmeta.FOMAML(m, inner_lr=0.1),
    lambda m: fastmeta.Reptile(m, inner_lr=0.1, inner_steps=2),
], ids=["fomaml", "reptile"])
def test_gradcheck_helper_refuses_first_order_learners(make):
    with pytest.raises(ValueError, match="first-order"):
        fastmeta.gradcheck(make(tiny_mlp()), make_task())


def test_meta_loss_is_refused_by_reptile():
    with pytest.raises(TypeError, match="Reptile has no differentiable meta-loss"):
        fastmeta.Reptile(nn.Linear(1, 1), inner_lr=0.1, inner_steps=1).meta_loss(make_task())

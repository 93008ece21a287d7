"""Every user error names the argument, the value and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastmeta
from tests.conftest import make_task


def mlp() -> nn.Module:
    return fastmeta.models.SineMLP(hidden=(8,))


def batch(task: fastmeta.TaskBatch) -> dict:
    return {"train": [task.support_x, task.support_y], "test": [task.query_x, task.query_y]}


@pytest.mark.parametrize("model", [lambda x: x, None, torch.zeros(3)], ids=["fn", "none", "tensor"])
def test_model_must_be_a_module(model):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fastmeta.MAML(model, inner_lr=0.1)


def test_model_without_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        fastmeta.MAML(nn.Linear(1, 1).requires_grad_(False), inner_lr=0.1)


@pytest.mark.parametrize("value", [0, -0.1, math.nan, math.inf])
def test_inner_lr_must_be_positive(value):
    with pytest.raises(ValueError, match=r"inner_lr must be > 0, got"):
        fastmeta.MAML(mlp(), inner_lr=value)


@pytest.mark.parametrize("value", [True, "0.1", None])
def test_inner_lr_must_be_a_number(value):
    with pytest.raises(TypeError, match="inner_lr must be a positive number"):
        fastmeta.MAML(mlp(), inner_lr=value)


@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError), (1.5, TypeError)])
def test_inner_steps_must_be_a_positive_integer(value, error):
    with pytest.raises(error, match=r"inner_steps must be"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_steps=value)


def test_unknown_inner_optimizer_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown inner_optimizer 'lbfgs'; choose one of 'sgd'"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer="lbfgs")


def test_unsupported_inner_optimizer_class():
    with pytest.raises(ValueError, match="inner_optimizer .*NAdam.* is not supported"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer=torch.optim.NAdam)


def test_inner_optimizer_instance_is_rejected():
    instance = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="pass the class itself"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer=instance)


def test_lr_in_inner_optimizer_kwargs_points_to_inner_lr():
    with pytest.raises(ValueError, match="must not contain 'lr'.*inner_lr"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer_kwargs={"lr": 0.5})


def test_maximize_is_rejected_instead_of_ignored():
    with pytest.raises(ValueError, match=r"\['maximize'\] are not supported"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer_kwargs={"maximize": True})


def test_unknown_inner_optimizer_kwarg_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"\['betas'\] are not settings of SGD; allowed"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer_kwargs={"betas": (0.9, 0.9)})


def test_invalid_inner_optimizer_setting_carries_torch_message():
    with pytest.raises(ValueError, match="rejected by torch.optim.SGD: Invalid momentum"):
        fastmeta.MAML(mlp(), inner_lr=0.1, inner_optimizer_kwargs={"momentum": -1})


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss_fn 'hinge'"):
        fastmeta.MAML(mlp(), inner_lr=0.1, loss_fn="hinge")


def test_unknown_engine():
    with pytest.raises(ValueError, match="unknown engine 'jax'"):
        fastmeta.MAML(mlp(), inner_lr=0.1, engine="jax")


def test_anil_head_must_exist():
    expected = r"head='classifier' is not a submodule.*\['body', 'head'\]"
    with pytest.raises(ValueError, match=expected):
        fastmeta.ANIL(mlp(), head="classifier", inner_lr=0.1)


def test_anil_head_must_have_trainable_parameters():
    model = mlp()
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="head='head' has no trainable parameters"):
        fastmeta.ANIL(model, head="head", inner_lr=0.1)


def test_fomaml_cannot_be_second_order():
    with pytest.raises(ValueError, match="Use fastmeta.MAML"):
        fastmeta.FOMAML(mlp(), inner_lr=0.1, first_order=False)


def test_reptile_takes_no_first_order_flag():
    with pytest.raises(ValueError, match="Reptile takes no first_order"):
        fastmeta.Reptile(mlp(), inner_lr=0.1, inner_steps=1, first_order=True)


def test_reptile_minibatch_larger_than_support_set():
    learner = fastmeta.Reptile(mlp(), inner_lr=0.1, inner_steps=2, inner_batch_size=10)
    with pytest.raises(ValueError, match="inner_batch_size=10 is larger than the 4 support"):
        learner.meta_step(make_task(shots=4), torch.optim.SGD(learner.parameters(), lr=1.0))


@pytest.mark.parametrize("missing,present", [("support", "test"), ("query", "train")])
def test_batch_missing_a_part(missing, present):
    task = make_task()
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(KeyError, match=f"batch has no {missing} set"):
        learner.meta_step({present: [task.support_x, task.support_y]},
                          torch.optim.SGD(learner.parameters(), lr=0.1))


def test_batch_part_must_be_a_pair():
    task = make_task()
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    three = [task.support_x, task.support_y, task.support_y]
    with pytest.raises(ValueError, match=r"batch\['train'\] must be a pair \[inputs, targets\]"):
        learner.meta_step({"train": three, "test": [task.query_x, task.query_y]},
                          torch.optim.SGD(learner.parameters(), lr=0.1))
    # [inputs] alone is an unlabelled support set: refused by MAML, with a pointer to DAML
    with pytest.raises(ValueError, match="support set has no targets.*fastmeta.DAML"):
        learner.meta_step({"train": [task.support_x], "test": [task.query_x, task.query_y]},
                          torch.optim.SGD(learner.parameters(), lr=0.1))


def test_support_inputs_and_targets_must_have_the_same_count():
    task = make_task(shots=4)
    bad = fastmeta.TaskBatch(task.support_x, task.support_y[:, :3], task.query_x, task.query_y)
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"support_x and support_y must agree.*\(3, 4\).*\(3, 3\)"):
        learner.meta_step(bad, torch.optim.SGD(learner.parameters(), lr=0.1))


def test_support_and_query_task_counts_must_match():
    task = make_task(tasks=3)
    bad = fastmeta.TaskBatch(task.support_x, task.support_y, task.query_x[:2], task.query_y[:2])
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match="3 support and 2 query tasks"):
        learner.meta_step(bad, torch.optim.SGD(learner.parameters(), lr=0.1))


def test_empty_support_set():
    task = make_task()
    bad = fastmeta.TaskBatch(task.support_x[:, :0], task.support_y[:, :0], task.query_x,
                             task.query_y)
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match="the support set is empty"):
        learner.meta_step(bad, torch.optim.SGD(learner.parameters(), lr=0.1))


def test_batch_without_task_dimension():
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    x = torch.randn(5)
    with pytest.raises(ValueError, match=r"\[tasks, examples, \.\.\.\].*unsqueeze\(0\)"):
        learner.meta_step(fastmeta.TaskBatch(x, x, x, x),
                          torch.optim.SGD(learner.parameters(), lr=0.1))


def test_batch_of_the_wrong_type():
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(TypeError, match="batch must be a fastmeta.TaskBatch"):
        learner.meta_step(torch.randn(3, 4), torch.optim.SGD(learner.parameters(), lr=0.1))


def test_adapt_input_errors():
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match="x and y must hold the same number of examples"):
        learner.adapt(torch.randn(5, 1), torch.randn(4, 1))
    with pytest.raises(ValueError, match="x is empty"):
        learner.adapt(torch.randn(0, 1), torch.randn(0, 1))
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        learner.adapt(torch.randn(5, 1), torch.randn(5, 1), steps=-1)


def test_optimizer_must_be_a_torch_optimizer():
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer"):
        learner.meta_step(make_task(), "adam")


def test_optimizer_over_other_parameters():
    learner = fastmeta.MAML(mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match="optimizer holds none of the learner's meta-parameters"):
        learner.meta_step(make_task(), torch.optim.SGD(mlp().parameters(), lr=0.1))


def test_optimizer_missing_meta_sgd_rates_warns_once():
    model = mlp()
    learner = fastmeta.MetaSGD(model, inner_lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"does not hold the meta-parameters \['inner_lrs"):
        learner.meta_step(make_task(), optimizer)
    learner.meta_step(make_task(), optimizer)  # no second warning (filterwarnings=error)


def test_divergence_raises_with_the_step_and_leaves_weights_untouched():
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = fastmeta.MAML(model, inner_lr=1e6, inner_steps=4)
    task = make_task()
    task = fastmeta.TaskBatch(task.support_x * 100, task.support_y * 100, task.query_x,
                              task.query_y)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    with pytest.raises(fastmeta.DivergenceError,
                       match=r"meta-step 1: .*inner step \d of 4.*try a smaller inner_lr") as info:
        learner.meta_step(task, optimizer)
    assert info.value.meta_step == 1 and info.value.inner_step is not None
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert learner.meta_steps_taken == 0


def test_divergence_in_adapt_warns():
    learner = fastmeta.MAML(mlp(), inner_lr=1e6, inner_steps=4)
    with pytest.warns(RuntimeWarning, match="support loss became non-finite"):
        learner.adapt(torch.randn(5, 1) * 100, torch.randn(5, 1) * 100)

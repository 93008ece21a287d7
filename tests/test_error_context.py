"""Errors that reach users through torch, rewritten to name the cause and the fix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta


def _classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))


def _batch(x: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, generator=g) if x is None else x
    labels = torch.randint(0, 3, (2, 5), generator=g) if labels is None else labels
    return {"train": [x, labels], "test": [x, labels]}


def _step(learner: fastmeta.MetaLearner, batch: dict, lr: float = 0.1) -> None:
    learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=lr))


@pytest.mark.parametrize("engine", ["vmap", "loop", "higher"])
def test_int32_labels_give_every_engine_the_int64_meta_gradient(engine):
    labels = _batch()["train"][1]
    grads = []
    for dtype in (torch.int64, torch.int32):
        learner = fastmeta.MAML(_classifier(), inner_lr=0.1, engine=engine,
                                loss_fn="cross_entropy")
        _step(learner, _batch(labels=labels.to(dtype)), lr=0.0)
        grads.append([p.grad for p in learner.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_user_loss_indexing_out_of_range_under_vmap_names_the_per_task_shapes():
    def margin(prediction, target):
        return -prediction[:, 7].mean() + 0 * target.sum()

    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, engine="vmap", loss_fn=margin)
    with pytest.raises(IndexError, match=r"loss_fn 'margin' raised IndexError \(index 7 is out "
                       r"of bounds.*a tensor of shape \(5, 3\).*targets, a tensor of shape "
                       r"\(5,\).*one task: \[shots, \.\.\.\] \(engine='vmap' calls loss_fn "
                       r"once per task\)"):
        _step(learner, _batch())


def test_a_dict_output_given_to_a_user_loss_says_how_to_take_the_prediction():
    class Scores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _classifier()

        def forward(self, x):
            return {"logits": self.body(x)}

    learner = fastmeta.MAML(Scores(), inner_lr=0.1, loss_fn=F.cross_entropy)
    with pytest.raises(TypeError, match=r"loss_fn 'cross_entropy' raised TypeError .*a dict "
                       r"with keys \['logits'\].*output_fn=lambda out: out\['logits'\]"):
        _step(learner, _batch())
    with pytest.raises(TypeError, match=r"a dict with keys \['logits'\]"):
        learner.adapt(*_batch()["train"][0][0:1], _batch()["train"][1][0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool], ids=["int", "bool"])
def test_integer_and_bool_inputs_to_float_layers_say_to_convert_them(dtype):
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn="cross_entropy")
    x = (torch.rand(2, 5, 2) * 3).to(dtype)
    message = (rf"the inputs hold {dtype} values \(shape \(2, 5, 2\)\), but the model "
               rf"computes in torch.float32 .*x\.float\(\)")
    with pytest.raises(TypeError, match=message):
        _step(learner, _batch(x=x))
    with pytest.raises(TypeError, match=message.replace(r"\(2, 5, 2\)", r"\(5, 2\)")):
        learner.adapt(x[0], _batch()["train"][1][0])


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = _classifier()
    with pytest.raises(ValueError, match=r"model has parameters on the meta device "
                                         r"\(\['0.weight'.*model.to_empty\(device='cpu'\)"):
        fastmeta.MAML(model, inner_lr=0.1)


def test_a_batch_on_the_meta_device_is_refused():
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn="cross_entropy")
    x = torch.randn(2, 5, 2, device="meta")
    with pytest.raises(ValueError, match=r"support_x is on the meta device \(shape \(2, 5, "
                                         r"2\), no values\)"):
        _step(learner, _batch(x=x))
    with pytest.raises(ValueError, match=r"x is on the meta device"):
        learner.adapt(x[0], torch.zeros(5, dtype=torch.int64))


def test_an_empty_query_set_is_refused_not_reported_as_divergence():
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn="cross_entropy")
    x, labels = _batch()["train"]
    with pytest.raises(ValueError, match=r"the query set is empty \(0 examples per task\)"):
        _step(learner, {"train": [x, labels], "test": [x[:, :0], labels[:, :0]]})


def test_batch_norm_in_train_mode_with_one_example_says_what_to_do():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    learner = fastmeta.MAML(model, inner_lr=0.1, loss_fn="cross_entropy")
    x, labels = torch.randn(2, 1, 2), torch.randint(0, 3, (2, 1))
    with pytest.raises(ValueError, match=r"BatchNorm layer in train mode got one value per "
                                         r"channel .*model\.eval\(\)"):
        _step(learner, _batch(x=x, labels=labels))


@pytest.mark.parametrize("lr", [math.nan, math.inf, -1.0])
def test_an_outer_learning_rate_that_is_not_finite_is_refused_before_any_update(lr):
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn="cross_entropy")
    before = [p.detach().clone() for p in learner.parameters()]
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = lr  # as a scheduler or a typo could set it
    with pytest.raises(ValueError, match=rf"optimizer's learning rate lr={lr} \(parameter "
                                         rf"group 0\) is not a finite number >= 0"):
        learner.meta_step(_batch(), optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.parameters()))


def test_non_finite_meta_parameters_are_blamed_on_what_wrote_them_not_on_inner_lr():
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn="cross_entropy")
    with torch.no_grad():
        learner.module[0].weight[0, 0] = math.nan
    with pytest.raises(fastmeta.DivergenceError, match=r"meta-parameters \['module.0.weight'\] "
                       r"were already not finite before this meta-step.*outer optimiser's "
                       r"learning rate"):
        _step(learner, _batch())

"""The task dimension is never guessed: shapes recorded, saved, and checked both ways."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta import AmbiguousShapeWarning
from fastmeta.bench import load_checkpoint, save_checkpoint


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 1))


def _batch(tasks: int = 2, shots: int = 5) -> dict:
    x, y = torch.randn(tasks, shots, 1), torch.randn(tasks, shots, 1)
    return {"train": [x, y], "test": [x, y]}


def _trained() -> fastmeta.MAML:
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    learner.meta_step(_batch(), torch.optim.SGD(learner.parameters(), lr=0.0))
    return learner


def test_the_example_shape_is_recorded_and_survives_state_dict(tmp_path):
    learner = _trained()
    assert learner.example_shape == (1,)
    fresh = fastmeta.MAML(_mlp(), inner_lr=0.1)
    assert fresh.example_shape is None
    fresh.load_state_dict(learner.state_dict())
    assert fresh.example_shape == (1,)
    save_checkpoint(tmp_path / "m.pt", {"state_dict": learner.state_dict()})
    loaded = fastmeta.MAML(_mlp(), inner_lr=0.1)
    loaded.load_state_dict(load_checkpoint(tmp_path / "m.pt")["state_dict"])
    with pytest.raises(ValueError, match=r"one leading dimension more.*adapt_many"):
        loaded.adapt(*_batch()["train"])


def test_a_state_dict_from_before_the_example_shape_still_loads():
    state = {k: v for k, v in _trained().state_dict().items() if k != "_extra_state"}
    fresh = fastmeta.MAML(_mlp(), inner_lr=0.1)
    fresh.load_state_dict(state)  # strict, and no missing key
    assert fresh.example_shape is None


def test_a_task_without_its_task_dimension_is_refused_once_the_shape_is_known():
    learner = _trained()
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    one_task = {"train": [x, y], "test": [x, y]}
    message = (r"support_x has shape \(5, 1\), which reads as 5 tasks of 1 examples of shape "
               r"\(\), but this learner's examples are \(1,\).*x\.unsqueeze\(0\)")
    with pytest.raises(ValueError, match=message):
        learner.meta_step(one_task, torch.optim.SGD(learner.parameters(), lr=0.0))
    with pytest.raises(ValueError, match=message):
        learner.adapt_many(one_task)
    learner.adapt_many({"train": [x[None], y[None]], "test": [x[None], y[None]]})


def test_a_fresh_learner_warns_with_both_readings_of_a_two_dimensional_batch():
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    with pytest.warns(AmbiguousShapeWarning, match=r"\(5, 1\), which reads two ways: 5 tasks "
                      r"of 1 scalar examples .*or one task of 5 examples of 1 features "
                      r"without its task dimension .*x\.unsqueeze\(0\)") as caught:
        learner.adapt_many({"train": [x, y], "test": [x, y]})
    assert caught[0].filename == __file__  # points at the caller's line


def test_stating_scalar_examples_silences_the_warning():
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    learner.example_shape = ()
    x, y = torch.randn(5, 1), torch.randn(5, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.adapt_many({"train": [x, y], "test": [x, y]})


def test_a_fresh_learner_warns_when_adapt_gets_what_may_be_a_batch():
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    x, y = _batch(tasks=4, shots=10)["train"]
    with pytest.warns(AmbiguousShapeWarning, match=r"x has shape \(4, 10, 1\) and y \(4, 10, "
                      r"1\), which read two ways: one task of 4 examples of shape \(10, 1\) "
                      r"\(how adapt reads it\), or 4 tasks of 10 examples of shape \(1,\) "
                      r"pooled into one .*adapt_many"):
        learner.adapt(x, y)
    learner.example_shape = (10, 1)  # one example is a sequence of 10 values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.adapt(x, y)


@pytest.mark.parametrize("value", ["abc", (1.5,), [(1,), "x"], (-1,)],
                         ids=["str", "float", "mixed", "negative"])
def test_example_shape_must_be_a_shape(value):
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    with pytest.raises(TypeError, match=r"example_shape must be the shape of one support "
                                        r"example, e.g. \(1,\)"):
        learner.example_shape = value


def test_a_malformed_example_shape_in_a_state_dict_is_refused():
    state = _trained().state_dict()
    state["_extra_state"] = torch.tensor([3, 1])
    with pytest.raises(ValueError, match="example shape in a learner's state_dict is malformed"):
        fastmeta.MAML(_mlp(), inner_lr=0.1).load_state_dict(state)


def test_several_input_tensors_have_one_shape_each():
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    learner.example_shape = [(3,), (2, 2)]
    assert learner.example_shape == ((3,), (2, 2))
    fresh = fastmeta.MAML(_mlp(), inner_lr=0.1)
    fresh.load_state_dict(learner.state_dict())
    assert fresh.example_shape == ((3,), (2, 2))

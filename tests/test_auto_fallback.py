"""engine="auto" runs every model that any exact engine runs, and keeps the fastest of them."""

from __future__ import annotations

import abc
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.engines import HigherEngine, LoopEngine, Tuner
from tests._zoo import reference_meta_gradient
from tests.conftest import make_task
from tests.test_tuner import FakeClock, Named, _costed, _paying


class Branchy(nn.Module):
    """A branch on the input's values: ``vmap`` refuses it, per-task engines run it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 100).any()):
            x = x.clamp(max=100)
        return self.b(torch.tanh(self.a(x)))


class _Abstract(nn.Module, abc.ABC):  # higher's patched classes cannot subclass this
    pass


class AbstractBranchy(_Abstract):
    """As :class:`Branchy`, on a base class higher cannot copy (as peft's models)."""

    forward = Branchy.forward

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(1, 8), nn.Linear(8, 1)


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


@pytest.mark.parametrize("verify", [True, False], ids=["checked", "unchecked"])
def test_auto_runs_a_model_only_the_loop_engine_runs(verify):
    task = make_task(dtype=torch.float64)
    _, expected = reference_meta_gradient(_model(AbstractBranchy), task, algorithm="maml",
                                          inner_lr=0.1, steps=2, loss=F.mse_loss)
    for engine in ("vmap", "higher"):  # what auto must not let the user see
        with pytest.raises((RuntimeError, TypeError)):
            learner = fastmeta.MAML(_model(AbstractBranchy), inner_lr=0.1, inner_steps=2,
                                    engine=engine)
            learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    model = _model(AbstractBranchy)
    learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=2, verify_engine=verify)
    with pytest.warns(UserWarning, match="engine='auto' uses the 'loop' engine: .*vmap"):
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    decision = learner.engine_decision
    assert learner.engine == "loop" and not decision.tuning
    assert "'higher' fails on this model too (TypeError" in decision.reason
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12)
    for _ in range(6):  # it stays there
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    assert learner.engine == "loop"


def test_where_vmap_refuses_auto_times_higher_and_loop_and_keeps_the_faster(monkeypatch):
    clock = FakeClock()
    _costed(monkeypatch, clock, {HigherEngine: 3.0, LoopEngine: 1.0})
    task = make_task(dtype=torch.float64)
    model = _model(Branchy)
    learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=2)
    with pytest.warns(UserWarning, match="uses the 'higher' engine: the vectorised engine "
                      "fails .*it times 'higher' and 'loop' on the next meta-steps"):
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    learner._engine._tuner.clock = clock
    assert learner.engine == "higher" and learner.engine_decision.tuning
    for _ in range(1 + 2 * 2 + 1):  # warm-up, two timed rounds, then the choice
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    decision = learner.engine_decision
    assert learner.engine == "loop" and not decision.tuning
    assert decision.timings == {"higher": 3.0, "loop": 1.0}
    assert "vmap" in decision.reason and "measured fastest: loop" in decision.reason
    _, expected = reference_meta_gradient(_model(Branchy), task, algorithm="maml",
                                          inner_lr=0.1, steps=2, loss=F.mse_loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12)


def test_a_candidate_that_fails_is_left_out_and_the_step_runs_on_the_next():
    clock, ran, undone = FakeClock(), [], []
    paying = _paying(clock, {"a": 1.0, "b": 2.0, "c": 3.0}, ran)

    def call(engine):
        if engine.name == "a":
            ran.append("a")
            raise TypeError("a cannot run this")
        return paying(engine)

    tuner = Tuner([(n, Named(n)) for n in "abc"], rounds=2, clock=clock)
    for _ in range(tuner.steps):
        label, result = tuner.run("k", call, undo=lambda: undone.append(1))
        assert label == result != "a"
    assert ran.count("a") == 1 and len(undone) == 1  # tried once, then never again
    assert tuner.failures == {"a": "TypeError: a cannot run this"}
    tuner.decide()
    assert tuner.chosen["k"] == "b" and tuner.timings["k"] == {"b": 2.0, "c": 3.0}


def test_an_error_of_every_candidate_is_the_inputs_and_rules_none_out():
    def call(engine):
        raise ValueError(f"bad input for {engine.name}")

    tuner = Tuner([(n, Named(n)) for n in "ab"])
    with pytest.raises(ValueError, match="bad input for a"):
        tuner.run("k", call)
    assert tuner.failures == {}
    assert tuner.run("k", lambda engine: engine.name) == ("a", "a")


def test_an_inner_optimizer_without_a_functional_rule_leaves_higher_alone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner = fastmeta.MAML(_model(Branchy), inner_lr=0.1, inner_optimizer="rmsprop")
    learner.meta_step(make_task(dtype=torch.float64),
                      torch.optim.SGD(learner.parameters(), lr=0.0))
    assert learner.engine == "higher" and not learner.engine_decision.tuning

"""engine="auto" times its exact candidates on real meta-steps and keeps the fastest."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.engines import LoopEngine, Tuner, VmapEngine
from fastmeta.engines._tuner import shape_key
from tests.conftest import make_task, tiny_mlp
from tests.test_auto_engine import _unknown_layer_model


class FakeClock:
    """Advances only when told to: each engine's run costs what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _costed(monkeypatch, clock: FakeClock, costs: dict[type, float]) -> None:
    for cls in costs:
        original = cls.meta_gradient

        def timed(self, *args, _original=original, _cls=cls, **kwargs):
            result = _original(self, *args, **kwargs)
            clock.now += costs[_cls] * (2 if getattr(self, "chunk_size", None) else 1)
            return result

        monkeypatch.setattr(cls, "meta_gradient", timed)


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


def _paying(clock: FakeClock, costs: dict[str, float], ran: list[str] | None = None):
    """A tuner's ``call(engine)`` that logs the engine's name and charges its cost."""

    def call(e):
        if ran is not None:
            ran.append(e.name)
        clock.now += costs[e.name]
        return e.name

    return call


def test_the_tuner_keeps_the_fastest_candidate_per_batch_shape():
    clock, ran = FakeClock(), []
    call = _paying(clock, {"a": 3.0, "b": 1.0, "c": 2.0}, ran)
    a, b, c = (("a", Named("a")), ("b", Named("b")), ("c", Named("c")))
    tuner = Tuner([a, b, c], rounds=2, clock=clock)
    for _ in range(tuner.steps):
        tuner.run(("shape",), call)
    assert ran == ["a", "a", "b", "c", "a", "b", "c"]  # warm-up, then two rounds
    assert tuner.ready() == [("shape",)]
    tuner.decide()
    assert tuner.chosen[("shape",)] == "b" and tuner.timings[("shape",)]["a"] == 3.0
    assert tuner.run(("shape",), call)[0] == "b"
    assert tuner.run(("other",), call)[0] == "a"  # a new shape starts over
    assert ("other",) not in tuner.chosen


def test_a_twin_of_an_earlier_candidate_is_not_run_and_takes_its_time():
    clock, ran = FakeClock(), []
    call = _paying(clock, {"a": 3.0, "b": 1.0, "c": 3.0}, ran)
    tuner = Tuner([(n, Named(n)) for n in "abc"], rounds=2, clock=clock)
    for _ in range(tuner.steps):  # as many steps as without a twin
        tuner.run("k", call, lambda label: "a" if label == "c" else None)
    # c's turns run the fastest candidate measured so far (b), which gets those times
    assert ran == ["a", "a", "b", "b", "a", "b", "b"]
    tuner.decide()
    assert tuner.timings["k"] == {"a": 3.0, "b": 1.0, "c": 3.0}
    assert tuner.chosen["k"] == "b"


def test_auto_spends_no_tuning_step_on_chunks_that_hold_every_task(monkeypatch):
    clock = FakeClock()
    _costed(monkeypatch, clock, {VmapEngine: 5.0, LoopEngine: 1.0})
    chunked = []
    original = VmapEngine.meta_gradient

    def spy(self, *args, **kwargs):
        chunked.append(self.chunk_size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VmapEngine, "meta_gradient", spy)
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    learner._engine._clock = clock
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    for _ in range(1 + 7 + 1):
        learner.meta_step(make_task(tasks=4, dtype=torch.float64), optimizer)
    assert learner.engine == "loop"
    assert learner.engine_decision.timings == {"vmap": 5.0, "loop": 1.0,
                                               "vmap, chunks of 4": 5.0}
    assert set(chunked) == {None}  # the chunked engine never ran


def test_every_rank_takes_the_choice_of_the_summed_times():
    other_rank = [5.0, 0.5]  # b is far faster there
    clock = FakeClock()
    call = _paying(clock, {"a": 1.0, "b": 2.0})
    tuner = Tuner([("a", Named("a")), ("b", Named("b"))], clock=clock)
    for _ in range(tuner.steps):
        tuner.run("k", call)
    tuner.decide(lambda mine: [x + y for x, y in zip(mine, other_rank)])
    assert tuner.chosen["k"] == "b"  # 6.0 against 2.5


def test_auto_takes_the_fastest_exact_engine_and_its_meta_gradients_are_exact(monkeypatch):
    clock = FakeClock()
    _costed(monkeypatch, clock, {VmapEngine: 5.0, LoopEngine: 1.0})
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2)
    learner._engine._clock = clock
    task = make_task(tasks=6, dtype=torch.float64)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    for _ in range(7):  # the tuner's 1 + 2 × 3 steps, the first (untimed) on the loop
        learner.meta_step(task, optimizer)
    assert learner.engine == "vmap"  # measured, decided at the next meta-step
    learner.meta_step(task, optimizer)
    decision = learner.engine_decision
    assert learner.engine == "loop" and "measured fastest: loop" in decision.reason
    assert decision.timings == {"vmap": 5.0, "loop": 1.0, "vmap, chunks of 4": 10.0}
    reference = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine="higher")
    reference.meta_step(task, torch.optim.SGD(reference.parameters(), lr=0.0))
    for a, b in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    # a new batch shape is measured anew
    learner.meta_step(make_task(tasks=6, shots=7, dtype=torch.float64), optimizer)
    assert learner.engine_decision.timings is None


def test_auto_never_tunes_towards_an_inexact_engine():
    learner = fastmeta.MAML(_unknown_layer_model(), inner_lr=0.5, inner_steps=2)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "engine='auto' uses the 'higher' engine")
        for _ in range(1 + 5 + 1):
            learner.meta_step(make_task(dtype=torch.float64), optimizer)
    assert set(learner.engine_decision.timings or {}) == {"higher", "loop"}
    assert learner.engine in ("higher", "loop")


def test_the_decision_says_while_tuning_goes_on():
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    assert learner.engine_decision.tuning  # before the first meta-step
    for _ in range(7):  # the tuner's steps
        learner.meta_step(make_task(dtype=torch.float64), optimizer)
        assert learner.engine_decision.tuning
    learner.meta_step(make_task(dtype=torch.float64), optimizer)
    assert not learner.engine_decision.tuning and learner.engine_decision.timings
    learner.meta_step(make_task(shots=7, dtype=torch.float64), optimizer)
    assert learner.engine_decision.tuning  # a new batch shape is measured anew
    learner.engine_tuning = False
    assert not learner.engine_decision.tuning
    assert not fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="vmap").engine_decision.tuning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rnn = fastmeta.MAML(nn.Sequential(nn.RNN(1, 4)), inner_lr=0.1)  # higher against loop
        rmsprop = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_optimizer="rmsprop")
    assert rnn.engine == "higher" and rnn.engine_decision.tuning
    assert rmsprop.engine == "higher" and not rmsprop.engine_decision.tuning  # nothing else runs


def test_tuning_can_be_turned_off():
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    learner.engine_tuning = False
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    for _ in range(10):
        learner.meta_step(make_task(dtype=torch.float64), optimizer)
    assert learner.engine == "vmap" and learner.engine_decision.timings is None
    assert fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="vmap").engine_tuning is False


def test_shape_keys_ignore_the_task_count():
    assert shape_key(make_task(tasks=3)) == shape_key(make_task(tasks=2))
    assert shape_key(make_task(shots=3)) != shape_key(make_task(shots=4))


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_chunked_vectorisation_equals_the_whole_batch(chunk):
    task = make_task(tasks=5, dtype=torch.float64)
    grads = []
    for engine in (VmapEngine(), VmapEngine(chunk_size=chunk), LoopEngine()):
        learner = fastmeta.MetaSGD(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine="vmap")
        learner._engine = engine
        result = learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
        assert result.task_losses.shape == (5,) and result.support_losses.shape == (5, 2)
        grads.append([p.grad for p in learner.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(optimizer):
    task = make_task(tasks=3, dtype=torch.float64)
    grads = []
    for engine in (LoopEngine(), LoopEngine(checkpoint_steps=True), "higher"):
        learner = fastmeta.MetaSGD(tiny_mlp(), inner_lr=0.05, inner_steps=4, engine=engine,
                                   inner_optimizer=optimizer,
                                   inner_optimizer_kwargs={"momentum": 0.9}
                                   if optimizer == "sgd" else None)
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
        grads.append([p.grad for p in learner.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def test_an_engine_object_is_taken_as_it_is_and_names_are_checked():
    engine = LoopEngine(checkpoint_steps=True)
    assert fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine=engine)._engine is engine
    with pytest.raises(ValueError, match="unknown engine 'fast'.*LoopEngine"):
        fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="fast")
    with pytest.raises(ValueError, match="compile=True applies to engine names"):
        fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine=engine, compile=True)

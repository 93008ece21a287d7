"""One rule for every candidate of engine="auto" that raises while it runs: the partial
``.grad`` is undone and the same meta-step runs on the next candidate. Out of memory sets
it aside for that batch shape; any other error for good."""

from __future__ import annotations

import pytest
import torch

import fastmeta
from fastmeta.engines import HigherEngine, Tuner, VmapEngine
from tests.conftest import make_task, tiny_mlp
from tests.test_auto_fallback import Branchy, _model
from tests.test_tuner import FakeClock, Named, _paying


def test_out_of_memory_sets_a_candidate_aside_for_its_batch_shape_only():
    clock, ran, undone, told = FakeClock(), [], [], []
    paying = _paying(clock, {"a": 1.0, "b": 2.0, "c": 3.0}, ran)

    def call(engine):
        if engine.name == "c" and len(ran) < 4:  # the first trial of c, on shape "k"
            ran.append("c")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return paying(engine)

    tuner = Tuner([(n, Named(n)) for n in "abc"], rounds=2, clock=clock)
    for _ in range(tuner.steps):
        tuner.run("k", call, undo=lambda: undone.append(1),
                  on_failure=lambda label, error: told.append(label))
    assert told == ["c"] and len(undone) == 1 and ran.count("c") == 1
    assert tuner.failures == {} and tuner.excluded["k"] == {"c"}
    tuner.decide()
    assert tuner.chosen["k"] == "a" and "c" not in tuner.timings["k"]
    for _ in range(tuner.steps):  # another batch shape still tries it
        tuner.run("other", call)
    tuner.decide()
    assert tuner.timings["other"] == {"a": 1.0, "b": 2.0, "c": 3.0}


def _train(engine: str, tasks: list, model_fn, **kwargs) -> fastmeta.MAML:
    learner = fastmeta.MAML(model_fn(), inner_lr=0.1, inner_steps=2, engine=engine, **kwargs)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)
    for task in tasks:
        learner.meta_step(task, optimizer)
    return learner


def test_where_vmap_refuses_a_per_task_engine_out_of_memory_reruns_the_step_on_the_next(
        monkeypatch):
    original, failures, armed = HigherEngine.meta_gradient, [], []

    def fake_allocator(self, module, *args, **kwargs):
        if armed:  # after the first meta-step: higher's trial runs out of memory
            for p in module.parameters():  # a backward pass that broke off half-way
                p.grad = torch.full_like(p, 1e3)
            failures.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(HigherEngine, "meta_gradient", fake_allocator)
    tasks = [make_task(dtype=torch.float64, seed=s) for s in range(10)]
    learner = fastmeta.MAML(_model(Branchy), inner_lr=0.1, inner_steps=2)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="it times 'higher' and 'loop'"):
        learner.meta_step(tasks[0], optimizer)
    armed.append(True)
    for task in tasks[1:]:
        learner.meta_step(task, optimizer)
    decision = learner.engine_decision
    assert failures == [1]  # set aside after its one failure
    assert learner.engine == "loop" and decision.out_of_memory == ("higher",)
    assert "out of memory once on: higher" in decision.reason
    assert learner.meta_steps_taken == 10
    uninterrupted = _train("loop", tasks, lambda: _model(Branchy))
    for a, b in zip(learner.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_vmap_candidate_that_raises_in_its_trial_is_ruled_out_and_the_step_reruns(
        monkeypatch):
    original, failures = VmapEngine.meta_gradient, []

    def broken_chunks(self, module, task, *args, **kwargs):
        if self.chunk_size == 4:
            for p in module.parameters():
                p.grad = torch.full_like(p, 1e3)
            failures.append(task.num_tasks)
            raise RuntimeError("a kernel this build lacks")
        return original(self, module, task, *args, **kwargs)

    monkeypatch.setattr(VmapEngine, "meta_gradient", broken_chunks)
    tasks = [make_task(tasks=8, dtype=torch.float64, seed=s) for s in range(10)]
    auto = _train("auto", tasks, tiny_mlp)
    assert failures == [8]
    decision = auto.engine_decision
    assert "'vmap, chunks of 4' fails on this model (RuntimeError: a kernel" in decision.reason
    assert "vmap, chunks of 4" not in decision.timings and decision.out_of_memory == ()
    uninterrupted = _train("loop", tasks, tiny_mlp)
    for a, b in zip(auto.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

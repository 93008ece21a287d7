"""engine="auto" within a memory budget: footprint, prediction, budget, out-of-memory retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastmeta
from fastmeta.engines import (
    LoopEngine,
    SavedTensorMeter,
    Tuner,
    VmapEngine,
    _auto,
    _memory,
    parse_memory_budget,
)
from tests._algorithms import ALGORITHMS
from tests.conftest import make_task, tiny_mlp
from tests.test_tuner import FakeClock, Named, _paying

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("value, expected", [
    ("auto", None), (1024, 1024), (2.5e9, 2_500_000_000), ("6GiB", 6 * 2**30),
    ("512MB", 512 * 10**6), (" 1.5 kib ", 1536), ("300MiB", 300 * 2**20), ("4096", 4096),
])
def test_memory_budget_takes_bytes_and_sizes(value, expected):
    assert parse_memory_budget(value) == expected


@pytest.mark.parametrize("value, error, match", [
    ("lots", ValueError, r"memory_budget must be 'auto'.*got 'lots'"),
    ("6 GiBs", ValueError, r"units: .*got '6 GiBs'"),
    (0, ValueError, r"memory_budget must be at least 1 byte, got 0; pass 'auto'"),
    (-5.0, ValueError, r"at least 1 byte, got -5.0"),
    (float("inf"), ValueError, r"at least 1 byte, got inf"),
    (True, TypeError, r"memory_budget must be 'auto', a number of bytes .*got True"),
    ([1], TypeError, r"got \[1\]"),
], ids=["word", "unit", "zero", "negative", "infinite", "bool", "list"])
def test_a_bad_memory_budget_names_the_argument_the_value_and_the_fix(value, error, match):
    with pytest.raises(error, match=match):
        fastmeta.MAML(tiny_mlp(), inner_lr=0.1, memory_budget=value)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_learner_takes_a_memory_budget(algorithm):
    model = fastmeta.models.SineMLP(hidden=(8, 8), activation="tanh")
    with pytest.raises(ValueError, match="memory_budget must be .*got 'much'"):
        ALGORITHMS[algorithm].build(model, memory_budget="much")
    learner = ALGORITHMS[algorithm].build(model, memory_budget="1GiB")
    assert learner.engine_decision.engine == learner.engine


def test_the_meter_counts_each_saved_storage_once_and_forgets_freed_graphs():
    weight = torch.randn(1000, requires_grad=True)
    with SavedTensorMeter([weight]) as meter:
        a = weight.exp()  # saves its result a (4,000 bytes)
        b = a.sin()  # saves a again: the same storage
        c = (b * weight).sum()  # saves b and weight (resident: not counted)
        assert meter.peak == meter.live == 8000
        c.backward()  # the graph lets its saved tensors go
        del a, b, c
    assert meter.live == 0 and meter.peak == 8000


def test_the_tuner_never_runs_or_keeps_an_excluded_candidate():
    clock, ran = FakeClock(), []
    call = _paying(clock, {"a": 3.0, "b": 1.0, "c": 0.5}, ran)
    tuner = Tuner([(n, Named(n)) for n in "abc"], rounds=2, clock=clock)
    tuner.plan("k", [(n, Named(n)) for n in "abc"], excluded=["c"])
    for _ in range(tuner.steps):
        tuner.run("k", call)
    assert "c" not in ran
    tuner.decide()
    assert tuner.chosen["k"] == "b" and "c" not in tuner.timings["k"]
    tuner.exclude("k", "b")  # it ran out of memory later: the next fastest
    assert tuner.chosen["k"] == "a"


@pytest.fixture
def steady_process(monkeypatch):
    """The process's memory in use stays put (a fake allocator's view): an explicit budget
    is then what candidates may add, whatever else the test process allocates."""
    monkeypatch.setattr(_memory, "memory_in_use", lambda device: 0)
    monkeypatch.setattr(_auto, "memory_in_use", lambda device: 0)


def _vmap_calls(monkeypatch) -> list[int]:
    """Tasks each ``VmapEngine`` vectorises at once, per meta-gradient call."""
    seen: list[int] = []
    original = VmapEngine.meta_loss

    def spy(self, module, task, *args, **kwargs):
        seen.append(task.num_tasks)
        return original(self, module, task, *args, **kwargs)

    monkeypatch.setattr(VmapEngine, "meta_loss", spy)
    return seen


def test_auto_runs_no_vmap_chunk_over_the_budget_and_stays_exact(monkeypatch, steady_process):
    task = make_task(tasks=8, dtype=torch.float64)
    sizer = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    sizer.meta_step(task, torch.optim.SGD(sizer.parameters(), lr=0.0))
    footprint = sizer.engine_decision.task_footprint
    weights = sum(p.numel() * 8 for p in sizer.parameters())
    assert footprint and footprint > 0
    # room for 2.5 tasks at once under vmap: chunks of 2 fit, 3 do not
    budget = int((2.5 * _memory.VMAP_FACTOR * footprint + 2 * weights)
                 / _memory.EXPLICIT_FRACTION)
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, memory_budget=budget)
    seen = _vmap_calls(monkeypatch)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    for _ in range(8):
        learner.meta_step(task, optimizer)
    decision = learner.engine_decision
    assert decision.memory_budget == int(_memory.EXPLICIT_FRACTION * budget)
    assert decision.predicted_peaks["vmap"] > budget
    assert "vmap, chunks of 2" in decision.timings and "vmap" not in decision.timings
    # the check compares the engines on 2 tasks first; after it no call takes more than 2
    assert seen and max(seen) == 2
    reference = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="higher")
    reference.meta_step(task, torch.optim.SGD(reference.parameters(), lr=0.0))
    for a, b in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_out_of_memory_in_a_trial_retries_that_step_once_and_loses_nothing(monkeypatch):
    failures = []
    original = VmapEngine.meta_gradient

    def fake_allocator(self, module, task, *args, **kwargs):
        if self.chunk_size is None and task.num_tasks == 6:  # every task at once
            for p in module.parameters():  # a backward pass that broke off half-way
                p.grad = torch.full_like(p, 1e3)
            failures.append(task.num_tasks)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, module, task, *args, **kwargs)

    monkeypatch.setattr(VmapEngine, "meta_gradient", fake_allocator)
    tasks = [make_task(tasks=6, dtype=torch.float64, seed=s) for s in range(10)]

    def train(engine: str) -> fastmeta.MAML:
        learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine=engine)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)
        for task in tasks:
            learner.meta_step(task, optimizer)
        return learner

    auto, uninterrupted = train("auto"), train("loop")
    assert failures == [6]  # vmap's trial ran out of memory once, and never ran again
    decision = auto.engine_decision
    assert decision.out_of_memory == ("vmap",) and "out of memory once on: vmap" in decision.reason
    assert "vmap" not in decision.timings and auto.meta_steps_taken == 10
    for a, b in zip(auto.parameters(), uninterrupted.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adapt_many_out_of_memory_adapts_task_by_task(monkeypatch):
    original = VmapEngine.adapt

    def fake_allocator(self, module, task, *args, **kwargs):
        if task.num_tasks > 2:  # the check's two tasks fit; the whole batch does not
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 21474836480 bytes")
        return original(self, module, task, *args, **kwargs)

    monkeypatch.setattr(VmapEngine, "adapt", fake_allocator)
    task = make_task(tasks=5, dtype=torch.float64)
    auto = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=3).adapt_many(task)
    loop = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=3, engine="loop")
    expected = loop.adapt_many(task)
    for name, value in expected.params.items():
        torch.testing.assert_close(auto.params[name], value, rtol=1e-12, atol=1e-12)


def test_an_error_that_is_not_out_of_memory_is_raised_as_it_is(monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch in the user's model")

    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    task = make_task(tasks=6, dtype=torch.float64)
    learner.meta_step(task, optimizer)  # checked, measured: the tuner's trials are next
    monkeypatch.setattr(VmapEngine, "meta_gradient", broken)
    monkeypatch.setattr(LoopEngine, "meta_gradient", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        learner.meta_step(task, optimizer)
    assert learner.engine_decision.out_of_memory == ()


def _worker(*args: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests._memory_worker", *args], cwd=ROOT, check=True,
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_conv4_at_the_omniglot_shape_completes_under_an_address_space_limit():
    # 400 MiB above the process's size: the per-task loop needs ~25 MiB, vmap ~1.4 GiB
    vectorised = _worker("rlimit", "vmap", "400", "32", "1")
    assert vectorised["done"] == 0 and "can't allocate memory" in vectorised["error"]
    auto = _worker("rlimit", "auto", "400", "32", "10")
    assert auto["done"] == 10 and auto["error"] is None
    assert auto["predicted"]["vmap"] > auto["budget"]
    assert "vmap" not in auto["timings"]  # never run, trial or not
    settled = auto["engines"][-1]
    assert settled == "loop" or any(label.startswith("vmap, chunks of")
                                    for label in auto["timings"])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs")
def test_the_peak_of_the_first_ten_meta_steps_stays_within_an_explicit_budget():
    budget = 200 * 2**20  # vmap on 16 tasks needs ~700 MiB
    run = _worker("budget", "200MiB", "16", "10", env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert run["done"] == 10 and run["predicted"]["vmap"] > budget
    assert run["peak"] <= budget, run


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs")
def test_scale_reports_the_whole_runs_peak_beside_the_settled_one():
    from tests.test_benchmarks import _load

    scale = _load("scale")
    peaks = scale.memory_child("sine", "auto", 4, "cpu", True)
    assert set(peaks) == {"run", "settled"}
    assert all(peak >= 0 for peak in peaks.values())


def test_the_footprint_benchmark_predicts_every_engine():
    from tests.test_benchmarks import _load

    predicted = _load("memory_footprint").predict("transformer")
    assert predicted["footprint"] > 0
    assert predicted["loop"] < predicted["vmap, chunks of 4"] <= predicted["vmap"]


def test_adapt_many_goes_in_chunks_that_fit_the_budget(monkeypatch, steady_process):
    task = make_task(tasks=9, dtype=torch.float64)
    loop = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=3, engine="loop")
    footprint = _memory.adapt_footprint(LoopEngine(), loop.module, task,
                                        loop.inner_loop(task, 3), fastmeta.engines.MetaGrad.NONE)
    weights = sum(p.numel() * 8 for p in loop.parameters())
    budget = int((3.5 * _memory.VMAP_FACTOR * footprint + 2 * weights)
                 / _memory.EXPLICIT_FRACTION)  # 3 tasks at once fit, 4 do not
    seen: list[int] = []
    original = VmapEngine.adapt

    def spy(self, module, part, *args, **kwargs):
        seen.append(part.num_tasks)
        return original(self, module, part, *args, **kwargs)

    monkeypatch.setattr(VmapEngine, "adapt", spy)
    auto = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=3, memory_budget=budget)
    adapted = auto.adapt_many(task)
    assert seen[1:] == [3, 3, 3]  # after the check's two tasks
    expected = loop.adapt_many(task)
    for name, value in expected.params.items():
        torch.testing.assert_close(adapted.params[name], value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapted.support_losses, expected.support_losses)


def test_out_of_memory_after_the_decision_moves_on_and_loses_nothing(monkeypatch):
    # A decided batch shape runs its candidate directly; running out of memory there (a
    # longer sequence elsewhere in the process, another job on the GPU) undoes the partial
    # .grad and sends the step back through the tuner, which sets the candidate aside.
    calls = {"decided": 0, "failed": 0}
    original = VmapEngine.meta_gradient
    tasks = [make_task(tasks=6, dtype=torch.float64, seed=s) for s in range(14)]
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine="auto")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)

    def fake_allocator(self, module, task, *args, **kwargs):
        if learner.meta_steps_taken == 10 and calls["failed"] < 2:
            for p in module.parameters():
                p.grad = torch.full_like(p, 1e3)
            calls["failed"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, module, task, *args, **kwargs)

    for task in tasks[:10]:
        learner.meta_step(task, optimizer)
    tuner = learner._engine._tuner
    key = next(iter(tuner.chosen))
    chosen = tuner.chosen[key]
    assert chosen != "loop"  # the vectorised candidates win on 6 tasks of a tiny MLP
    monkeypatch.setattr(VmapEngine, "meta_gradient", fake_allocator)
    for task in tasks[10:]:
        learner.meta_step(task, optimizer)
    # twice: on the direct path, then once more through the tuner, which set it aside
    assert calls["failed"] == 2 and chosen in tuner.excluded[key]
    assert tuner.chosen[key] != chosen and learner.meta_steps_taken == 14
    reference = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine="loop")
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    for task in tasks:
        reference.meta_step(task, reference_optimizer)
    for a, b in zip(learner.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_decided_batch_shape_skips_the_plan_and_the_tuner(monkeypatch):
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine="auto")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)
    for seed in range(10):
        learner.meta_step(make_task(tasks=6, seed=seed), optimizer)
    assert learner._engine._tuner.chosen
    planned = []
    monkeypatch.setattr(type(learner._engine), "_plan_memory",
                        lambda *args, **kwargs: planned.append(1))
    learner.meta_step(make_task(tasks=6, seed=11), optimizer)
    assert planned == []
    with pytest.raises(AttributeError):  # another shape takes the full path (the fake)
        learner.meta_step(make_task(tasks=6, shots=7, seed=12), optimizer)
    assert planned == [1]


def test_turning_tuning_on_after_an_untuned_start_tunes():
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_steps=2, engine="auto")
    learner.engine_tuning = False
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.05)
    for seed in range(3):
        learner.meta_step(make_task(tasks=6, seed=seed), optimizer)
    assert learner._engine._tuner is None or not learner._engine._tuner.chosen
    learner.engine_tuning = True
    for seed in range(3, 14):
        learner.meta_step(make_task(tasks=6, seed=seed), optimizer)
    assert learner._engine._tuner.chosen and learner.engine_decision.timings

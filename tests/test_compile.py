"""compile=True: the compiled vectorised meta-step agrees with the uncompiled one."""

from __future__ import annotations

import pytest
import torch

import fastmeta
from tests.conftest import make_task


@pytest.mark.slow
@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
def test_compiled_and_uncompiled_meta_steps_agree(first_order):
    task = make_task(tasks=5, shots=10, query=10)
    grads = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        learner = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01, inner_steps=2,
                                first_order=first_order, engine="vmap", compile=compile_)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
        for _ in range(2):  # the second call reuses the compiled step
            result = learner.meta_step(task, optimizer)
        assert learner._engine.compile == compile_  # compiled, not silently fallen back
        grads.append(([p.grad.clone() for p in learner.parameters()], result.task_losses))
    (eager, eager_losses), (compiled, compiled_losses) = grads
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("backend exploded")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    learner = fastmeta.MAML(fastmeta.models.SineMLP(hidden=(8,)), inner_lr=0.01, compile=True)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    with pytest.warns(RuntimeWarning, match="compile failed on this model .*backend exploded"):
        first = learner.meta_step(make_task(), optimizer)
    second = learner.meta_step(make_task(), optimizer)  # no second warning
    assert first.loss == second.loss


def test_outputs_of_cuda_graphs_are_copied_before_the_next_replay(monkeypatch):
    # With mode="reduce-overhead" the next replay overwrites the compiled function's
    # outputs; the losses a MetaStepResult keeps must be copies. (No GPU here: a stand-in
    # compiled function, marked as running on CUDA graphs, returns tensors it owns.)
    from fastmeta.engines._vmap import VmapEngine

    owned = [torch.tensor(1.0, requires_grad=True) * 2, torch.zeros(3), torch.ones(3, 1)]
    engine = VmapEngine(compile=True)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    model = torch.nn.Linear(1, 1)
    task = make_task(tasks=3)
    call = engine._maybe_compiled(lambda *args: tuple(owned), model, fastmeta.MAML(
        model, inner_lr=0.1).inner_loop(task, 1), None, None, "mean")  # type: ignore[arg-type]
    trainable = dict(model.named_parameters())
    layout = (tuple(trainable), (), (), (False, False, False, False))
    engine._compiled[(call.args[0], layout)] = (lambda *tensors: tuple(owned), True)
    mean, query, support = call(trainable, {}, {}, task, None)
    assert all(a is not b for a, b in zip((mean, query, support), owned))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip((mean, query, support), owned))
    assert mean.requires_grad and torch.equal(query, owned[1])

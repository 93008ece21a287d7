"""compile=True: the compiled vectorised meta-step agrees with the uncompiled one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta
from tests.conftest import make_task, tiny_mlp


class _WithUnused(nn.Module):
    """A tanh MLP with a parameter that its forward never reads."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()
        self.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8), nn.Tanh(),
                         nn.Linear(8, 1)).double()


def _frozen_body() -> nn.Module:
    model = tiny_mlp()
    model[0].requires_grad_(False)
    return model


# (learner, whether its compiled meta-gradient is differentiated in the compiled graph)
COMPILED_CASES = {
    "maml": (lambda engine, compile_: fastmeta.MAML(
        tiny_mlp(), inner_lr=0.1, inner_steps=2, engine=engine, compile=compile_), True),
    "fomaml": (lambda engine, compile_: fastmeta.MAML(
        tiny_mlp(), inner_lr=0.1, inner_steps=2, first_order=True, engine=engine,
        compile=compile_), True),
    "anil": (lambda engine, compile_: fastmeta.ANIL(
        tiny_mlp(), head="4", inner_lr=0.1, inner_steps=2, engine=engine,
        compile=compile_), True),
    "unused parameter": (lambda engine, compile_: fastmeta.MAML(
        _WithUnused(), inner_lr=0.1, engine=engine, compile=compile_), True),
    "frozen layer": (lambda engine, compile_: fastmeta.MAML(
        _frozen_body(), inner_lr=0.1, engine=engine, compile=compile_), True),
    "batch norm": (lambda engine, compile_: fastmeta.MAML(
        _batch_norm_net(), inner_lr=0.1, engine=engine, compile=compile_), True),
    "daml, a fixed inner loss": (lambda engine, compile_: fastmeta.DAML(
        tiny_mlp(), adaptation_loss=lambda out: (out**2).mean(), inner_lr=0.1,
        engine=engine, compile=compile_), True),
    # learned inner learning rates: autograd's backward writes their meta-gradient
    "meta-sgd": (lambda engine, compile_: fastmeta.MetaSGD(
        tiny_mlp(), inner_lr=0.1, engine=engine, compile=compile_), False),
    "maml++": (lambda engine, compile_: fastmeta.MAMLPlusPlus(
        tiny_mlp(), inner_lr=0.1, inner_steps=2, multi_step_loss=False, engine=engine,
        compile=compile_), False),
}


# In the default run: one case in the compiled graph, one that reaches a parameter only
# some of the way, one differentiated by backward; the rest are slow (each compiles anew).
DEFAULT_CASES = ("maml", "unused parameter", "meta-sgd")


@pytest.mark.parametrize("case", [
    case if case in DEFAULT_CASES else pytest.param(case, marks=pytest.mark.slow)
    for case in COMPILED_CASES])
def test_compiled_meta_gradient_equals_the_per_task_loop(case):
    # float64: the compiled step's meta-gradient (None for what it does not reach), its
    # losses, and the gradients it adds to .grad, against the per-task loop's.
    build, in_graph = COMPILED_CASES[case]
    # torch.compile stops compiling a function after a few configurations in one process
    # (torch._dynamo.config.recompile_limit) and runs it uncompiled: start afresh.
    torch._dynamo.reset()
    task = make_task(tasks=4, shots=6, query=5, dtype=torch.float64)
    results = []
    for engine, compile_ in (("loop", False), ("vmap", True)):
        learner = build(engine, compile_)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
        for _ in range(2):  # the second call runs the compiled function found on the first
            result = learner.meta_step(task, optimizer)
        grads = {n: None if p.grad is None else p.grad.clone()
                 for n, p in learner.named_parameters()}
        learner.meta_gradient(learner.prepare(task))  # adds to .grad, as backward does
        added = {n: None if p.grad is None else p.grad.clone()
                 for n, p in learner.named_parameters()}
        results.append((grads, added, result.task_losses))
    if compile_:
        assert learner._engine.compile  # compiled, not fallen back
        vmap = learner._engine._vmap if hasattr(learner._engine, "_vmap") else learner._engine
        assert [r is not None for r in vmap._reached.values()] == [in_graph]
    (loop_grads, loop_added, loop_losses), (grads, added, losses) = results
    for name, reference in loop_grads.items():
        if reference is None:
            assert grads[name] is None and added[name] is None, name
            continue
        torch.testing.assert_close(grads[name], reference, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(added[name], loop_added[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(added[name], 2 * reference, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(losses, loop_losses, rtol=1e-9, atol=1e-12)


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


def test_gradients_from_cuda_graphs_are_copied_before_the_next_replay(monkeypatch):
    # On CUDA graphs the next replay overwrites the compiled function's outputs, the
    # meta-gradient among them: .grad must hold copies. (No GPU here: the function runs
    # uncompiled and is marked as running on CUDA graphs.)
    produced = {}

    def uncompiled(fn, mode=None):
        def call(*tensors):
            grads, query, support = fn(*tensors)
            produced.update(grads)
            return grads, query, support
        return call

    monkeypatch.setattr(torch, "compile", uncompiled)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)
    model = tiny_mlp()
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap", compile=True)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    task = make_task(dtype=torch.float64)
    learner.meta_step(task, optimizer)
    engine = learner._engine
    engine._compiled.update({key: (fn, True) for key, (fn, _) in engine._compiled.items()})
    learner.meta_step(task, optimizer)
    for name, param in model.named_parameters():
        assert param.grad.data_ptr() != produced[name].data_ptr(), name
        assert torch.equal(param.grad, produced[name])


def test_weight_norm_refuses_compiling_loudly_and_stays_exact():
    # Compiled, weight norm's second-order meta-gradient was 9e-2 (relative, float64) off
    # the per-task loop, the only layer family of the zoo that was: compile=True runs such
    # a model uncompiled, with a warning naming the layer.
    from tests._zoo import ZOO, draw_task

    entry = ZOO["weight_norm"]
    task = draw_task(entry)
    grads = []
    for engine, compile_ in (("loop", False), ("vmap", True)):
        learner = fastmeta.MAML(entry.build(), inner_lr=0.1, inner_steps=2, engine=engine,
                                compile=compile_)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
        if compile_:
            with pytest.warns(RuntimeWarning, match=r"compile=True: submodule '2' is "
                                                    r"weight-normalised"):
                learner.meta_step(task, optimizer)
            assert not learner._engine.compile
        learner.meta_step(task, optimizer)
        grads.append([p.grad.clone() for p in learner.parameters()])
    for compiled, reference in zip(*grads):
        torch.testing.assert_close(compiled, reference, rtol=1e-9, atol=1e-12)

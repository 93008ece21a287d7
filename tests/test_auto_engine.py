"""engine="auto": it checks itself, decides once, never downgrades on a bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from fastmeta.engines import (
    AutoEngine,
    VmapEngine,
    is_torch_func_refusal,
    smaller_probe,
)
from tests.conftest import make_task, tiny_mlp

SGD0 = dict(lr=0.0)


class HandWrittenLayerNorm(nn.Module):
    """Calls ``F.layer_norm`` itself, so nothing marks it as a layer norm: a stand-in for
    any layer whose batching rule is wrong and that fastmeta does not know about."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(1, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.last = nn.Linear(5, 1)

    def forward(self, x):
        return self.last(torch.tanh(F.layer_norm(self.first(x), (5,), self.scale)))


def _unknown_layer_model():
    torch.manual_seed(0)
    return HandWrittenLayerNorm().double()


def _grads(learner):
    return [p.grad.clone() for p in learner.parameters()]


def test_auto_notices_a_wrong_batching_rule_and_takes_the_exact_engine():
    task = make_task(tasks=4, dtype=torch.float64)
    vmap = fastmeta.MAML(_unknown_layer_model(), inner_lr=0.5, inner_steps=2, engine="vmap")
    vmap.meta_step(task, torch.optim.SGD(vmap.parameters(), **SGD0))
    exact = fastmeta.MAML(_unknown_layer_model(), inner_lr=0.5, inner_steps=2, engine="higher")
    exact.meta_step(task, torch.optim.SGD(exact.parameters(), **SGD0))
    # torch's rule is wrong here (this is what auto must guard against)
    assert max(float((a - b).abs().max()) for a, b in zip(_grads(vmap), _grads(exact))) > 1e-6

    auto = fastmeta.MAML(_unknown_layer_model(), inner_lr=0.5, inner_steps=2)
    assert auto.engine == "vmap"
    with pytest.warns(UserWarning, match=r"uses the 'higher' engine: its meta-gradient differs "
                                         r"from a per-task computation .*relative error"):
        auto.meta_step(task, torch.optim.SGD(auto.parameters(), **SGD0))
    assert auto.engine == "higher"
    for a, b in zip(_grads(auto), _grads(exact)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    decision = auto.engine_decision
    assert decision.engine == "higher" and decision.checked == ("meta_gradient",)
    assert decision.max_error is not None and decision.max_error > 1e-7


def test_auto_checks_adapt_too():
    auto = fastmeta.MAML(_unknown_layer_model(), inner_lr=0.5, inner_steps=2)
    task = make_task(dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.adapt(task.support_x[0], task.support_y[0])  # first order: this rule is right
    assert auto.engine == "vmap" and auto.engine_decision.checked == ("adapt",)


def test_the_check_leaves_model_rng_and_gradients_untouched():
    model = fastmeta.models.Conv4(in_channels=1, num_classes=1, hidden=3, image_size=6,
                                  track_running_stats=True).double().train()
    learner = fastmeta.MAML(model, inner_lr=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    engine = learner._engine
    assert isinstance(engine, AutoEngine)
    task = make_task(x_shape=(1, 6, 6), dtype=torch.float64)
    engine.check("meta_gradient", lambda e, d, small: learner._probe(
        "meta_gradient", task, None, e, d, small))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in learner.parameters())
    assert learner.engine == "vmap" and learner.engine_decision.checked == ("meta_gradient",)
    assert learner.engine_decision.max_error < 1e-7  # the tolerance of the check
    assert learner.engine_decision.check_seconds > 0


class SharedLog(list):
    """A list that copies of a model share (the check runs on a deep copy)."""

    def __deepcopy__(self, memo):
        return self


class ShapeRecorder(nn.Module):
    """An MLP that logs the number of examples of every call outside ``vmap``."""

    def __init__(self, allowed: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.body = tiny_mlp()
        self.allowed, self.log = allowed, SharedLog()

    def forward(self, x):
        if not torch._C._functorch.is_batchedtensor(x):
            self.log.append(x.shape[0])
            if self.allowed and x.shape[0] not in self.allowed:
                raise ValueError(f"built for {self.allowed} examples, got {x.shape[0]}")
        return self.body(x)


def test_the_check_runs_two_inner_steps_on_a_query_set_the_size_of_the_support_set():
    model = ShapeRecorder()
    learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=5)
    learner.meta_step(make_task(tasks=3, shots=4, query=30, dtype=torch.float64),
                      torch.optim.SGD(learner.parameters(), **SGD0))
    # first the learner's check of the output's shape on the support set, then higher on
    # the first two tasks: 2 inner steps on the 4 support examples, then 4 of the 30 query
    # examples, per task (vmap's calls are batched and not logged); then the footprint of
    # one task (its 5 inner steps and its 30 query examples, no backward) and the first
    # meta-step, untimed, on the per-task loop (3 tasks)
    one_task = [4] * 5 + [30]
    assert model.log == [4] + [4, 4, 4] * 2 + one_task + one_task * 3
    assert learner.engine == "vmap" and learner.engine_decision.checked == ("meta_gradient",)


def test_smaller_probe_cuts_the_query_examples_and_keeps_per_task_context():
    query = {"x": torch.randn(2, 30, 3), "edges": torch.zeros(2, 2, 7)}
    task = fastmeta.TaskBatch(torch.randn(2, 4, 3), torch.randn(2, 4), query,
                              torch.randn(2, 30))
    small = smaller_probe(task)
    assert small.query_x["x"].shape == (2, 4, 3) and small.query_y.shape == (2, 4)
    assert small.query_x["edges"].shape == (2, 2, 7)
    assert torch.equal(small.query_x["x"], query["x"][:, :4])
    one_shot = make_task(tasks=2, shots=1, query=9)
    assert smaller_probe(one_shot).query_x.shape[1] == 2  # BatchNorm needs two examples
    assert smaller_probe(make_task(shots=4, query=3)).query_x.shape[1] == 3


def test_a_model_built_for_its_query_size_is_checked_on_the_whole_query_set():
    # 1 support and 9 query examples; the small probe would feed it 2
    model = ShapeRecorder(allowed=(1, 9))
    learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.meta_step(make_task(tasks=2, shots=1, query=9, dtype=torch.float64),
                          torch.optim.SGD(learner.parameters(), **SGD0))
    assert learner.engine == "vmap"
    assert learner.engine_decision.checked == ("meta_gradient",)
    assert learner.engine_decision.max_error < 1e-7


def test_the_decision_is_inspectable_and_the_check_can_be_turned_off():
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    assert learner.engine_decision.checked == ()
    learner.meta_step(make_task(dtype=torch.float64),
                      torch.optim.SGD(learner.parameters(), **SGD0))
    assert learner.engine_decision.checked == ("meta_gradient",)
    assert "checked against higher" in learner.engine_decision.reason
    unchecked = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, verify_engine=False)
    unchecked.meta_step(make_task(dtype=torch.float64),
                        torch.optim.SGD(unchecked.parameters(), **SGD0))
    assert unchecked.engine == "vmap" and unchecked.engine_decision.checked == ()
    explicit = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="higher")
    assert explicit.engine_decision.reason.startswith("chosen explicitly")


def _classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 3))


def _token_task(labels_high: int = 3, tasks: int = 2):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (tasks, 4, 3), generator=g)
    return {"train": [ids, torch.randint(0, labels_high, (tasks, 4), generator=g)],
            "test": [ids, torch.randint(0, labels_high, (tasks, 4), generator=g)]}


@pytest.mark.parametrize("verify", [True, False])
def test_a_bad_batch_raises_its_own_error_and_the_engine_stays(verify):
    # A plain callable loss, so that the bad labels reach the engine (the named loss
    # "cross_entropy" refuses them before any engine runs: see test_structured.py).
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn=F.cross_entropy,
                            verify_engine=verify)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|Target 7"):
        learner.meta_step(_token_task(labels_high=8), optimizer)  # labels 0..7, 3 classes
    assert learner.engine == "vmap"
    learner.meta_step(_token_task(), optimizer)  # then a good one runs vectorised
    assert learner.engine == "vmap"
    if verify:
        assert learner.engine_decision.checked == ("meta_gradient",)


def test_meta_step_inside_no_grad_still_updates_and_keeps_the_engine():
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    before = [p.detach().clone() for p in learner.parameters()]
    with torch.no_grad():
        learner.meta_step(make_task(dtype=torch.float64),
                          torch.optim.SGD(learner.parameters(), lr=0.1))
    assert learner.engine == "vmap"
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))


def test_integer_inputs_adapt_on_the_vectorised_engine():
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn="cross_entropy",
                            engine="vmap")
    batch = _token_task()
    ids, labels = batch["train"][0][0], batch["train"][1][0]
    for steps in (0, 2):
        adapted = learner.adapt(ids, labels, steps=steps)
        assert adapted(ids).shape == (4, 3)
        assert adapted.support_losses.dtype == torch.float32
    many = learner.adapt_many(batch, steps=1)
    assert many(batch["test"][0]).shape == (2, 4, 3)


def test_out_of_memory_is_never_taken_for_a_refusal(monkeypatch):
    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("vmap: CUDA out of memory")

    assert not is_torch_func_refusal(torch.OutOfMemoryError("vmap: out of memory"))
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, verify_engine=False)
    monkeypatch.setattr(VmapEngine, "meta_loss", out_of_memory)
    # not a refusal (no switch to higher, no warning): the step runs again on the loop
    learner.meta_step(make_task(dtype=torch.float64),
                      torch.optim.SGD(learner.parameters(), lr=0.1))
    assert learner.engine_decision.out_of_memory == ("vmap",)
    assert learner.engine != "higher" and learner.meta_steps_taken == 1
    explicit = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="vmap")
    with pytest.raises(torch.OutOfMemoryError):  # chosen explicitly: nothing else to try
        explicit.meta_step(make_task(dtype=torch.float64),
                           torch.optim.SGD(explicit.parameters(), lr=0.1))


class CallsItem(nn.Module):
    """Data-dependent Python control flow: torch.func cannot vectorise it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x):
        out = self.linear(x)
        return out * 2 if out.sum().item() > 1e9 else out


@pytest.mark.parametrize("verify", [True, False])
def test_torch_func_refusals_choose_higher_once(verify):
    learner = fastmeta.MAML(CallsItem().double(), inner_lr=0.1, verify_engine=verify)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"uses the 'higher' engine: .*\.item\(\)"):
        learner.meta_step(make_task(dtype=torch.float64), optimizer)
    assert learner.engine == "higher"
    with pytest.raises(ValueError, match="must agree on"):  # a later bad batch: no switching
        learner.meta_step(fastmeta.TaskBatch(torch.zeros(2, 3, 1), torch.zeros(2, 4, 1),
                                        torch.zeros(2, 3, 1), torch.zeros(2, 3, 1)), optimizer)
    assert learner.engine == "higher"


def test_refusals_are_recognised_by_their_messages():
    assert is_torch_func_refusal(RuntimeError("vmap: It looks like you're calling .item()"))
    assert is_torch_func_refusal(RuntimeError("Batching rule not implemented for aten::foo"))
    assert not is_torch_func_refusal(RuntimeError("Expected all tensors on the same device"))
    assert not is_torch_func_refusal(ValueError("vmap: not a runtime error"))


def test_a_compile_failure_caused_by_the_input_keeps_compiling(monkeypatch):
    def broken(fn, *args, **kwargs):
        def call(*a, **k):
            raise RuntimeError("backend exploded")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    learner = fastmeta.MAML(_classifier(), inner_lr=0.1, loss_fn=F.cross_entropy,
                            engine="vmap", compile=True)  # the bad labels reach the engine
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds|Target 7"):
        learner.meta_step(_token_task(labels_high=8), optimizer)
    assert learner._engine.compile is True  # the compiler was not to blame
    with pytest.warns(RuntimeWarning, match="torch.compile failed on this model"):
        learner.meta_step(_token_task(), optimizer)
    assert learner._engine.compile is False


class _Agreeing:
    """A stand-in for fastmeta.distributed's averager: every rank reports ``verdict``."""

    def __init__(self, verdict: int) -> None:
        self.verdict, self.seen = verdict, []

    def agree(self, learner, verdict):
        self.seen.append(verdict)
        return max(verdict, self.verdict)

    def __call__(self, learner, local):
        return local()


@pytest.mark.parametrize("other_rank", [0, 2])
def test_every_rank_takes_the_same_decision(other_rank):
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1)
    learner.meta_gradient_sync = sync = _Agreeing(other_rank)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if other_rank else "error")
        learner.meta_step(make_task(dtype=torch.float64), optimizer)
    assert sync.seen == [0]  # this rank's own check agreed
    assert learner.engine == ("higher" if other_rank else "vmap")
    learner.meta_step(make_task(dtype=torch.float64), optimizer)
    assert sync.seen == [0]  # decided once


def _dropout_model():
    model = nn.Sequential(nn.Linear(1, 2000, bias=False), nn.Dropout(0.5),
                          nn.Flatten(0, -1)).double()
    nn.init.ones_(model[0].weight)
    return _Mean(model)


class _Mean(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body[1](self.body[0](x)).mean(-1, keepdim=True)


@pytest.mark.parametrize("engine", ["vmap", "higher", "auto"])
def test_dropout_draws_its_own_mask_for_every_task(engine):
    torch.manual_seed(0)
    learner = fastmeta.FOMAML(_dropout_model(), inner_lr=1e-9, engine=engine)
    tasks = 40
    ones = torch.ones(tasks, 1, 1, dtype=torch.float64)
    result = learner.meta_step(fastmeta.TaskBatch(ones, 0 * ones, ones, 0 * ones),
                               torch.optim.SGD(learner.parameters(), lr=0.0))
    outputs = result.support_losses[:, 0].sqrt()  # |mean of 2000 scaled Bernoulli(0.5)|
    assert learner.engine == ("vmap" if engine == "auto" else engine)
    assert len(set(outputs.tolist())) > tasks // 2  # every task its own mask (counts can tie)
    assert abs(float(outputs.mean()) - 1.0) < 0.02  # E = 1
    assert 0.5 < float(outputs.std()) / (2 * 0.5 / 2000 ** 0.5) < 1.6  # std = 0.022


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_a_compiled_module_is_unwrapped_with_a_warning(engine):
    model = tiny_mlp()
    with pytest.warns(UserWarning, match=r"torch.compile'd module.*compile=True"):
        learner = fastmeta.MAML(torch.compile(model), inner_lr=0.1, engine=engine)
    assert learner.module is model
    learner.meta_step(make_task(dtype=torch.float64),
                      torch.optim.SGD(learner.parameters(), lr=0.1))
    assert all(p.grad is not None for p in model.parameters())


def test_adapted_models_cast_inputs_like_adapt():
    model = nn.Linear(2, 1).to(torch.bfloat16)
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    adapted = learner.adapt(x, y)
    assert adapted(x).dtype == torch.bfloat16
    many = learner.adapt_many({"train": [x[None], y[None]], "test": [x[None], y[None]]})
    assert many(x[None]).dtype == torch.bfloat16

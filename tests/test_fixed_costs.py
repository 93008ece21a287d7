"""The per-step fixed costs removed from meta_step stay correct: cached module walks,
the cached optimiser check and the fused finiteness check."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta._structure import structure
from tests.conftest import make_task


def _names(module: nn.Module) -> list[str]:
    return [n for n, _ in structure(module).named_parameters()]


def test_walk_matches_torch_and_is_reused():
    model = fastmeta.models.Conv4(in_channels=1, num_classes=3, hidden=4, image_size=8)
    walk = structure(model)
    assert structure(model) is walk
    assert _names(model) == [n for n, _ in model.named_parameters()]
    assert all(a is b for (_, a), (_, b) in zip(walk.named_parameters(),
                                                model.named_parameters()))
    assert list(walk.named_buffers()) == [n for n, _ in model.named_buffers()]
    assert list(walk.modules) == list(model.modules())


def test_walk_follows_new_submodules_parameters_and_tied_weights():
    model = nn.Sequential(nn.Linear(2, 2))
    assert _names(model) == ["0.weight", "0.bias"]
    model.append(nn.Linear(2, 2))
    assert _names(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    model[1].weight = model[0].weight  # tied: reported once, as torch does
    assert _names(model) == [n for n, _ in model.named_parameters()]
    model[0].scale = nn.Parameter(torch.ones(()))
    assert _names(model) == [n for n, _ in model.named_parameters()]


def test_tensors_are_read_when_used_not_when_walked():
    norm = nn.BatchNorm1d(2)
    walk = structure(norm)
    fresh = torch.full((2,), 3.0)
    norm._buffers["running_mean"] = fresh  # behind torch's back: no registration hook
    assert structure(norm).named_buffers()["running_mean"] is fresh
    weight = nn.Parameter(torch.zeros(2))
    norm._parameters["weight"] = weight
    assert dict(structure(norm).named_parameters())["weight"] is weight
    assert structure(norm) is walk


def test_requires_grad_is_read_at_every_step():
    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1))
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    assert learner.adapted_names() == ("0.weight", "0.bias", "1.weight", "1.bias")
    model[0].requires_grad_(False)
    assert learner.adapted_names() == ("1.weight", "1.bias")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.meta_step(make_task(tasks=2), optimizer)
    assert model[0].weight.grad is None and model[1].weight.grad is not None


def test_optimizer_check_runs_again_when_its_groups_change():
    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1))
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"does not hold the meta-parameters \['module.1.weight'"):
        learner.meta_step(make_task(tasks=2), optimizer)
    optimizer.add_param_group({"params": list(model[1].parameters())})
    learner._warned_optimizer = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learner.meta_step(make_task(tasks=2), optimizer)  # now complete: no warning
    with pytest.raises(ValueError, match="holds none of the learner's meta-parameters"):
        learner.meta_step(make_task(tasks=2), torch.optim.SGD([nn.Parameter(torch.ones(1))],
                                                              lr=0.1))


class _Huge(nn.Module):
    """Finite gradients whose fused sum overflows float32."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((1,), 0.5))
        self.b = nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (self.a * 1e38 + self.b * 1e38)  # loss 1e38, gradients 1e38 each


def test_finite_but_huge_gradients_are_not_called_divergent():
    learner = fastmeta.FOMAML(_Huge(), inner_lr=1e-80, engine="vmap",
                              loss_fn=lambda out, y: out.mean())
    task = fastmeta.TaskBatch(*(torch.full((1, 2, 1), 1.0) for _ in range(4)))
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    grads = [p.grad for p in learner.parameters()]
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(sum(g.abs().max() for g in grads) + 2e38) == float("inf")  # sum overflows


def test_a_non_finite_gradient_is_still_found_and_named():
    class Sqrt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))
            self.v = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.v + torch.sqrt(self.w.abs()) * 0

    learner = fastmeta.FOMAML(Sqrt(), inner_lr=0.1, engine="vmap", loss_fn="mse",
                              adapt=["v"])  # NaN only in the outer gradient of w
    with pytest.raises(fastmeta.DivergenceError, match=r"meta-gradient of \['module.w'\]"):
        learner.meta_step(make_task(tasks=2),
                          torch.optim.SGD(learner.parameters(), lr=0.1))


def test_optimizer_check_runs_again_when_the_learners_parameters_change():
    model = nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1))
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.meta_step(make_task(tasks=2), optimizer)  # complete: checked, no warning
    model[1].bias = nn.Parameter(torch.zeros(1))  # a new parameter the optimiser lacks
    with pytest.warns(UserWarning, match=r"does not hold the meta-parameters \['module.1.bias'"):
        learner.meta_step(make_task(tasks=2), optimizer)


def test_a_cached_walk_never_keeps_a_model_alive():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    alive = weakref.ref(model)
    structure(model)
    learner = fastmeta.MAML(model, inner_lr=0.1)
    structure(learner)
    del model, learner
    gc.collect()
    assert alive() is None


class _Counter(nn.Module):
    """Reassigns a buffer in forward (not in place), as some user modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.linear(x)


def _call_zoo() -> list[nn.Module]:
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    shared = nn.Linear(3, 3)
    return [
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 3)),
        nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train(),
        tied,
        nn.Sequential(shared, nn.Tanh(), shared),
        nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)),
        nn.utils.parametrizations.orthogonal(nn.Linear(3, 3)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_call_equals_functional_call_and_leaves_the_module_as_it_was(index):
    from torch.func import functional_call

    from fastmeta._tree import call

    torch.manual_seed(0)
    model = _call_zoo()[index]
    x = torch.randn(5, 3)
    pristine = copy.deepcopy(model)
    before = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    state = {n: t.detach() * 1.5 + 0.1 for n, t in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    twin = {n: b.clone() for n, b in buffers.items()}
    ours = call(model, (state, buffers) if buffers else state, x)
    after = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    partial = dict(list(state.items())[:1])  # names left out keep the module's own
    ours_partial = call(model, partial, x)
    # torch's own, each on a fresh copy: it leaves a submodule used twice holding the
    # given tensor
    theirs = functional_call(copy.deepcopy(pristine), (state, twin) if twin else state, (x,))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for n, b in buffers.items():  # batch statistics were written to the given copies
        torch.testing.assert_close(b, twin[n], rtol=0, atol=0)
    torch.testing.assert_close(
        ours_partial, functional_call(copy.deepcopy(pristine), partial, (x,)), rtol=0, atol=0)


def test_call_gives_back_reassigned_buffers_and_restores_after_an_error():
    from torch.func import functional_call

    from fastmeta._tree import call

    model = _Counter()
    ours = {"calls": torch.zeros(())}
    theirs = {"calls": torch.zeros(())}
    call(model, ours, torch.randn(1, 2))
    functional_call(model, theirs, (torch.randn(1, 2),))
    assert float(ours["calls"]) == float(theirs["calls"]) == 1.0
    assert float(model.calls) == 0.0
    weight = model.linear.weight
    with pytest.raises(RuntimeError):
        call(model, {"linear.weight": torch.zeros(5, 5)}, torch.randn(1, 2))
    assert model.linear.weight is weight


def test_call_leaves_unknown_and_repeated_names_to_functional_call():
    from fastmeta._tree import call

    model = nn.Linear(2, 2)
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="weight"):  # torch's message for a name given twice
        call(model, ({"weight": torch.zeros(2, 2)}, {"weight": torch.ones(2, 2)}), x)
    shared = nn.Sequential(model, model)
    weight = model.weight
    # "1.weight" is the shared module's second name: both uses see the given tensor
    out = call(shared, {"1.weight": torch.zeros(2, 2)}, x)
    torch.testing.assert_close(out, model.bias.expand(1, 2), rtol=0, atol=0)
    assert model.weight is weight
    with pytest.raises(ValueError, match="weight"):  # one tensor under two names, twice
        call(shared, {"0.weight": torch.zeros(2, 2), "1.weight": torch.ones(2, 2)}, x)


def test_the_math_attention_context_selects_math_only_and_restores_every_backend():
    from fastmeta.engines._exact import _ATTENTION_BACKENDS, _MathAttention

    before = [get() for get, _, _ in _ATTENTION_BACKENDS]
    with _MathAttention():
        assert [get() for get, _, _ in _ATTENTION_BACKENDS] == [
            math for _, _, math in _ATTENTION_BACKENDS]
    assert [get() for get, _, _ in _ATTENTION_BACKENDS] == before


def test_shape_checks_run_again_for_a_batch_of_another_shape():
    learner = fastmeta.MAML(nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1)), inner_lr=0.1,
                            loss_fn="mse")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    learner.meta_step(make_task(tasks=2), optimizer)
    learner.meta_step(make_task(tasks=2), optimizer)  # same shapes: checked once
    bad = fastmeta.TaskBatch(torch.randn(2, 5, 1), torch.randn(2, 5, 2), torch.randn(2, 5, 1),
                             torch.randn(2, 5, 1))
    with pytest.raises(ValueError, match=r"support set of task 0"):
        learner.meta_step(bad, optimizer)


def test_a_batch_like_the_last_one_is_returned_as_given():
    learner = fastmeta.MAML(nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1)), inner_lr=0.1,
                            loss_fn="mse")
    first, second = make_task(tasks=2), make_task(tasks=2)
    learner.prepare(first)
    assert learner.prepare(second) is second  # no copy, no new TaskBatch
    as_dict = {"train": [second.support_x, second.support_y],
               "test": [second.query_x, second.query_y]}
    prepared = learner.prepare(as_dict)
    assert all(a is b for a, b in zip(prepared, second))


def test_the_same_shapes_are_moved_again_after_the_model_changes_dtype():
    learner = fastmeta.MAML(nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1)), inner_lr=0.1,
                            loss_fn="mse")
    task = make_task(tasks=2)
    learner.prepare(task)
    learner.double()
    assert all(t.dtype == torch.float64 for t in learner.prepare(task))
    learner.float()
    assert all(t.dtype == torch.float32 for t in learner.prepare(task))


def test_labels_are_read_on_every_batch_of_known_shapes():
    learner = fastmeta.MAML(nn.Linear(4, 3), inner_lr=0.1, loss_fn="cross_entropy")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)

    def batch(high: int) -> fastmeta.TaskBatch:
        return fastmeta.TaskBatch(torch.randn(2, 6, 4), torch.randint(0, high, (2, 6)),
                                  torch.randn(2, 6, 4), torch.randint(0, 3, (2, 6)))

    learner.meta_step(batch(3), optimizer)
    learner.meta_step(batch(3), optimizer)
    bad = batch(3)
    bad.support_y[1, 2] = 7
    with pytest.raises(ValueError, match=r"support_y of task 1 holds the label 7"):
        learner.meta_step(bad, optimizer)


def test_a_change_of_example_shape_or_mode_checks_the_batch_again(monkeypatch):
    learner = fastmeta.MAML(nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1)), inner_lr=0.1,
                            loss_fn="mse")
    checked = []
    check = learner._check_loss
    monkeypatch.setattr(learner, "_check_loss", lambda *a, **k: checked.append(1) or check(*a, **k))
    task = make_task(tasks=2)
    learner.prepare(task)
    learner.prepare(task)
    assert len(checked) == 1
    learner.eval()  # another mode: the model's output may differ
    learner.prepare(task)
    assert len(checked) == 2
    learner.example_shape = None  # forgotten (as after loading an older state)
    learner.prepare(task)
    assert len(checked) == 3
    learner.prepare(task)
    assert len(checked) == 3


def test_a_meta_step_result_reads_its_losses_when_asked():
    learner = fastmeta.MAML(nn.Sequential(nn.Linear(1, 3), nn.Linear(3, 1)), inner_lr=0.1,
                            inner_steps=2, loss_fn="mse")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    task = make_task(tasks=3)
    result = learner.meta_step(task, optimizer)
    expected = learner.meta_loss(task).detach()
    assert isinstance(result.loss, float) and result.loss == pytest.approx(float(expected))
    assert result.task_losses.shape == (3,) and result.task_losses.device.type == "cpu"
    assert result.loss == pytest.approx(float(result.task_losses.mean()))
    assert result.support_losses.shape == (3, 2) and not result.support_losses.requires_grad
    assert result.inner_losses is result.support_losses and not result.skipped
    assert repr(result).startswith(f"MetaStepResult(loss={result.loss:.6g}, task_losses=[3]")

"""The vectorised and higher engines give the same meta-gradients and adapted models."""

from __future__ import annotations

import itertools

import pytest
import torch

import fastmeta
from tests.conftest import make_task, tiny_mlp


def conv4_batchnorm():
    torch.manual_seed(0)
    return fastmeta.models.Conv4(in_channels=1, num_classes=1, hidden=3, image_size=6,
                                 track_running_stats=True).double().train()


MODELS = {"mlp": (tiny_mlp, (1,)), "conv4-bn": (conv4_batchnorm, (1, 6, 6))}
ALGORITHMS = {
    "maml": lambda m, **kw: fastmeta.MAML(m, **kw),
    "metasgd": lambda m, **kw: fastmeta.MetaSGD(m, **kw),
    "anil": lambda m, **kw: fastmeta.ANIL(m, head=_head(m), **kw),
    "reptile": lambda m, first_order, **kw: fastmeta.Reptile(m, **kw),
}


def _zero_gradient_params(learner, task):
    """Parameters whose support gradient is zero up to rounding in some task (e.g. a conv
    bias right before BatchNorm, which BatchNorm cancels)."""
    names = set()
    for t in range(task.num_tasks):
        loss = learner.loss_fn(learner(task.support_x[t]), task.support_y[t])
        grads = torch.autograd.grad(loss, list(learner.module.parameters()))
        names |= {f"module.{n}" for (n, _), g in zip(learner.module.named_parameters(), grads)
                  if g.abs().max() < 1e-10}
    return names


def _head(model):
    return "head" if hasattr(model, "head") else "4"


CASES = [
    case for case in itertools.product(ALGORITHMS, ["first", "second"], [1, 3], MODELS,
                                       ["sgd", "adam"])
    if not (case[0] == "reptile" and case[1] == "second")  # Reptile has no order
]


def build(algorithm, order, steps, model_name, optimizer, engine):
    factory, x_shape = MODELS[model_name]
    model = factory()
    learner = ALGORITHMS[algorithm](model, inner_lr=0.05, inner_steps=steps,
                                    first_order=order == "first", inner_optimizer=optimizer,
                                    engine=engine)
    if algorithm == "metasgd":
        with torch.no_grad():
            for i, rate in enumerate(learner.inner_lrs.values()):
                rate.fill_(0.02 + 0.01 * i)
    return learner, x_shape


@pytest.mark.parametrize("algorithm,order,steps,model_name,optimizer", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_vmap_and_higher_agree(algorithm, order, steps, model_name, optimizer):
    grads, predictions = {}, {}
    for engine in ("higher", "vmap"):
        learner, x_shape = build(algorithm, order, steps, model_name, optimizer, engine)
        assert learner.engine == engine
        task = make_task(tasks=3, shots=4, query=3, x_shape=x_shape, dtype=torch.float64)
        result = learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
        grads[engine] = {n: p.grad for n, p in learner.named_parameters()}
        zero_gradient = _zero_gradient_params(learner, task)
        adapted = learner.adapt(task.support_x[0], task.support_y[0], steps=2)
        predictions[engine] = (adapted(task.query_x[0]), result.task_losses,
                               result.support_losses)
    for name, higher_grad in grads["higher"].items():
        if algorithm == "reptile" and optimizer == "adam" and name in zero_gradient:
            # Its true gradient is 0; Adam turns the ±1e-17 rounding noise into ±inner_lr
            # steps, and Reptile's θ − φ reports those steps as they are.
            continue
        torch.testing.assert_close(grads["vmap"][name], higher_grad, rtol=1e-10, atol=1e-10)
    for higher_value, vmap_value in zip(predictions["higher"], predictions["vmap"]):
        torch.testing.assert_close(vmap_value, higher_value, rtol=1e-10, atol=1e-10)


def test_reptile_minibatches_agree_across_engines():
    outputs = []
    for engine in ("higher", "vmap"):
        torch.manual_seed(3)  # same minibatch draw for both
        learner = fastmeta.Reptile(tiny_mlp(), inner_lr=0.05, inner_steps=4, inner_batch_size=3,
                                   engine=engine)
        learner.meta_step(make_task(shots=5, dtype=torch.float64),
                          torch.optim.SGD(learner.parameters(), lr=0.0))
        outputs.append([p.grad for p in learner.parameters()])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reptile_with_minibatches_adapts_for_zero_steps():
    learner = fastmeta.Reptile(tiny_mlp(), inner_lr=0.05, inner_steps=4, inner_batch_size=3)
    task = make_task(shots=5, dtype=torch.float64)
    adapted = learner.adapt_many(task, steps=0)
    torch.testing.assert_close(adapted(task.query_x), torch.stack(
        [learner(task.query_x[t]) for t in range(task.num_tasks)]))


def test_auto_picks_vmap_for_supported_models():
    assert fastmeta.MAML(tiny_mlp(), inner_lr=0.1).engine == "vmap"
    learner = fastmeta.MetaSGD(conv4_batchnorm(), inner_lr=0.1, inner_optimizer="adamw")
    assert learner.engine == "vmap"


def test_auto_falls_back_once_with_a_warning_naming_the_reason():
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Linear(4, 1))
    with pytest.warns(UserWarning, match="'adagrad' has no functional rule"):
        learner = fastmeta.MAML(model, inner_lr=0.1, inner_optimizer="adagrad")
    assert learner.engine == "higher"
    learner.meta_step(make_task(), torch.optim.SGD(learner.parameters(), lr=0.1))  # no warning


def test_explicit_vmap_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="engine='vmap' cannot run this learner: .*'rmsprop'"):
        fastmeta.MAML(tiny_mlp(), inner_lr=0.1, inner_optimizer="rmsprop", engine="vmap")
    lstm = torch.nn.LSTM(1, 2)
    with pytest.raises(ValueError, match="engine='vmap' cannot run this learner: .*LSTM"):
        fastmeta.MAML(lstm, inner_lr=0.1, engine="vmap")


def test_compile_needs_the_vectorised_engine():
    with pytest.raises(ValueError, match="compile=True needs the vectorised engine"):
        fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine="higher", compile=True)


def test_vmap_engine_never_writes_batchnorm_buffers_nor_leaves_them_switched():
    model = conv4_batchnorm()
    learner = fastmeta.MAML(model, inner_lr=0.1, engine="vmap")
    before = {n: b.clone() for n, b in model.named_buffers()}
    learner.meta_step(make_task(x_shape=(1, 6, 6), dtype=torch.float64),
                      torch.optim.SGD(learner.parameters(), lr=0.1))
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert all(m.track_running_stats for m in model.modules()
               if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("engine", ["higher", "vmap"])
def test_second_order_through_batchnorm_matches_finite_differences(engine):
    """Regression: torch's vmap batching rule for batch norm gives wrong second-order
    gradients (torch 2.13); the vmap engine must not inherit that."""
    learner = fastmeta.MAML(conv4_batchnorm(), inner_lr=0.05, inner_steps=2, engine=engine)
    report = fastmeta.gradcheck(learner, make_task(tasks=2, x_shape=(1, 6, 6)), max_elements=4)
    assert report.ok, str(report)


@pytest.mark.parametrize("engine", ["higher", "vmap"])
def test_adapt_many_equals_adapting_each_task_and_is_pure(engine):
    model = tiny_mlp()
    learner = fastmeta.MetaSGD(model, inner_lr=0.05, inner_steps=2, engine=engine)
    task = make_task(tasks=4, dtype=torch.float64)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = learner.adapt_many(task, steps=3)
    assert len(adapted) == 4 and adapted.support_losses.shape == (4, 3)
    outputs = adapted(task.query_x)
    for t in range(4):
        single = learner.adapt(task.support_x[t], task.support_y[t], steps=3)
        torch.testing.assert_close(outputs[t], single(task.query_x[t]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(adapted[t](task.query_x[t]), outputs[t])
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="one slice per adapted task.*expected 4"):
        adapted(task.query_x[:2])


def _definition(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The normalisations written out, for the per-task reference."""
    if kind == "layer_norm":
        dims = list(range(x.dim() - w.dim(), x.dim()))
        shape = list(w.shape)
    else:
        dims = [0, *range(2, x.dim())] if kind == "batch_norm" else list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + 1e-5) * w.view(shape) + b.view(shape)


def _exact_form(kind: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from fastmeta.engines import _exact

    if kind == "layer_norm":
        return _exact.layer_norm(x, tuple(w.shape), w, b)
    if kind == "batch_norm":
        return _exact.batch_norm(x, None, None, w, b, training=True)
    return _exact.instance_norm(x, None, None, w, b)


@pytest.mark.parametrize(("kind", "x_shape", "w_shape"), [
    ("layer_norm", (5, 4), (4,)),
    ("layer_norm", (5, 3, 4), (3, 4)),
    ("batch_norm", (5, 4), (4,)),
    ("batch_norm", (5, 4, 3, 3), (4,)),
    ("instance_norm", (5, 4, 6), (4,)),
])
def test_exact_normalisations_are_exact_to_second_order_under_vmap(kind, x_shape, w_shape):
    """fastmeta's normalisations (torch's kernel without its affine part, then the affine)
    under vmap, two second-order inner steps with per-task weights, against the definitions
    in a per-task loop (float64). torch's kernels given the per-task weight are wrong here."""
    g = torch.Generator().manual_seed(0)
    tasks, channels = 3, x_shape[1]
    data = [torch.randn(tasks, *x_shape, generator=g, dtype=torch.float64) for _ in range(3)]
    start = [torch.randn(w_shape, generator=g, dtype=torch.float64) for _ in range(2)]
    mix0 = torch.randn(channels, channels, generator=g, dtype=torch.float64)

    def meta_gradient(norm, vectorised):
        params = [t.clone().requires_grad_() for t in (*start, mix0)]

        def loss(p, x, c):
            h = torch.movedim(torch.movedim(x, 1, -1) @ p[2], -1, 1)  # mixes the channels
            return (norm(h, p[0], p[1]) * c).sin().sum()

        def one_task(x, q, c):
            fast = params
            for _ in range(2):
                grads = torch.func.grad(loss)(fast, x, c)
                fast = [p - 0.1 * gr for p, gr in zip(fast, grads)]
            return loss(fast, q, c)

        if vectorised:
            torch.func.vmap(one_task)(*data).sum().backward()
        else:
            for t in range(tasks):
                one_task(*(d[t] for d in data)).backward()
        return [p.grad for p in params]

    exact = meta_gradient(lambda *a: _exact_form(kind, *a), vectorised=True)
    reference = meta_gradient(lambda *a: _definition(kind, *a), vectorised=False)
    for got, want in zip(exact, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

"""DAML: meta-gradients reach the initialisation and the learned loss; label-free adapt."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmeta
from tests.conftest import make_task, tiny_mlp
from tests.test_meta_gradients import _gradcheck

FEATURES = ("3", "1")  # tiny_mlp: the second and the first tanh, as the blog post's [y, h2, h1]


class LossNet(nn.Module):
    """Tiny learned loss over [output, h2, h1]; smooth (squared) so finite differences work."""

    def __init__(self, dtype: torch.dtype = torch.float64, seed: int = 1) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(17, 3), nn.Tanh(), nn.Linear(3, 1)).to(dtype)

    def forward(self, output, h2, h1):  # type: ignore[no-untyped-def]
        return self.net(torch.cat([output, h2, h1], dim=-1)).pow(2).mean()


def daml(engine: str = "vmap", steps: int = 2, **kwargs) -> fastmeta.DAML:  # type: ignore[no-untyped-def]
    return fastmeta.DAML(tiny_mlp(), adaptation_loss=kwargs.pop("loss", LossNet()), inner_lr=0.1,
                         inner_steps=steps, features=FEATURES, loss_fn="l1", engine=engine,
                         **kwargs)


def unlabelled(task: fastmeta.TaskBatch) -> dict:
    return {"train": [task.support_x], "test": [task.query_x, task.query_y]}


def grads_of(learner: fastmeta.MetaLearner, batch) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=0.0))
    return [p.grad.clone() for p in learner.parameters()]


# ---------------------------------------------------------------- meta-gradients


def test_meta_gradient_reaches_model_and_loss_network_and_matches_finite_differences():
    torch.manual_seed(0)  # a 1-4-4-1 model and a 9-3-1 loss network: 71 meta-parameters
    model = nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(),
                          nn.Linear(4, 1)).double()
    loss_net = nn.Sequential(nn.Linear(9, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    learner = fastmeta.DAML(model, inner_lr=0.1, inner_steps=2, features=FEATURES,
                            adaptation_loss=lambda *o: loss_net(torch.cat(o, -1)).pow(2).mean())
    learner.loss_net = loss_net  # registered, so learner.parameters() includes it
    assert len([p for p in learner.parameters()]) == 10
    task = make_task(tasks=2, shots=3, query=4, dtype=torch.float64)
    assert _gradcheck(learner, fastmeta.TaskBatch(task.support_x, None, task.query_x, task.query_y))


def test_fastmeta_gradcheck_checks_daml_on_unlabelled_batches():
    learner = daml(loss=LossNet(torch.float32)).float()
    report = fastmeta.gradcheck(learner, unlabelled(make_task()), max_elements=1)
    assert report.ok, str(report)
    assert any(name.startswith("adaptation_loss.") for name in report.errors)


def _forward(x, w):  # type: ignore[no-untyped-def]
    h1 = torch.tanh(F.linear(x, w[0], w[1]))
    h2 = torch.tanh(F.linear(h1, w[2], w[3]))
    return F.linear(h2, w[4], w[5]), h2, h1


def _learned_loss(out, h2, h1, v):  # type: ignore[no-untyped-def]
    h = torch.tanh(F.linear(torch.cat([out, h2, h1], dim=-1), v[0], v[1]))
    return F.linear(h, v[2], v[3]).pow(2).mean()


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_meta_gradient_equals_hand_unrolled_loop(engine):
    task = make_task(dtype=torch.float64)
    learner = daml(engine, steps=3)
    w = [p.detach().clone().requires_grad_() for p in learner.module.parameters()]
    v = [p.detach().clone().requires_grad_() for p in learner.adaptation_loss.parameters()]
    total = 0
    for t in range(task.num_tasks):
        fast = list(w)
        for _ in range(3):
            inner = _learned_loss(*_forward(task.support_x[t], fast), v)
            grads = torch.autograd.grad(inner, fast, create_graph=True)
            fast = [f - 0.1 * g for f, g in zip(fast, grads)]
        total = total + F.l1_loss(_forward(task.query_x[t], fast)[0], task.query_y[t])
    expected = torch.autograd.grad(total / task.num_tasks, w + v)
    got = grads_of(learner, unlabelled(task))
    assert len(got) == len(expected) == 10
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert any(g.abs().max() > 0 for g in got[6:])  # the loss network does learn


def test_engines_agree_on_meta_gradients_and_adapted_predictions():
    task = make_task(dtype=torch.float64, seed=3)
    batch = unlabelled(task)
    results = {}
    for engine in ("vmap", "higher"):
        learner = daml(engine, steps=3)
        adapted = learner.adapt_many(batch)(task.query_x)
        single = learner.adapt(task.support_x[1])(task.query_x[1])
        results[engine] = (grads_of(learner, batch), adapted, single)
    (grads_v, adapted_v, single_v), (grads_h, adapted_h, single_h) = results.values()
    for a, b in zip(grads_v, grads_h):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(adapted_v, adapted_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(single_v, single_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(single_v, adapted_v[1], rtol=1e-10, atol=1e-10)


def test_support_targets_are_optional_in_every_spelling_and_ignored_when_given():
    task = make_task(dtype=torch.float64)
    query = [task.query_x, task.query_y]
    spellings = [
        {"train": [task.support_x], "test": query},
        {"train": task.support_x, "test": query},
        {"support": [task.support_x, None], "query": query},
        {"train": [task.support_x, task.support_y], "test": query},
        fastmeta.TaskBatch(task.support_x, None, task.query_x, task.query_y),
    ]
    learner = daml()
    losses = [float(learner.meta_loss(batch).detach()) for batch in spellings]
    assert losses == pytest.approx([losses[0]] * len(losses), rel=1e-12)


def test_adapt_without_targets_is_pure():
    learner = daml(steps=3)
    for p in learner.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    adapted = learner.adapt(torch.randn(2, 1, dtype=torch.float64))
    assert adapted.support_losses.shape == (3,)
    assert not torch.equal(adapted.params["0.weight"], learner.module[0].weight)
    for key, value in learner.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in learner.parameters())
    assert all(not m._forward_hooks for m in learner.modules())  # capture hooks removed


def test_learner_holds_the_loss_network_as_meta_parameters():
    learner = daml()
    loss_params = {id(p) for p in learner.adaptation_loss.parameters()}
    assert loss_params <= {id(p) for p in learner.parameters()}
    assert any(k.startswith("adaptation_loss.") for k in learner.state_dict())
    assert "features=('3', '1')" in repr(learner)


def test_meta_step_trains_the_loss_network():
    learner = daml()
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in learner.adaptation_loss.parameters()]
    learner.meta_step(unlabelled(make_task(dtype=torch.float64)), optimizer)
    after = list(learner.adaptation_loss.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_non_scalar_adaptation_loss_is_a_clear_error(engine):
    def per_example(output, h2, h1):  # type: ignore[no-untyped-def]
        return output.abs()  # [shots, 1], not reduced

    learner = daml(engine, loss=per_example)
    with pytest.raises(ValueError, match=r"adaptation_loss must return a scalar.*\(4, 1\)"):
        learner.meta_step(unlabelled(make_task(dtype=torch.float64)),
                          torch.optim.SGD(learner.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="adaptation_loss must return a scalar"):
        learner.adapt(torch.randn(4, 1, dtype=torch.float64))


def test_feature_that_forward_never_calls_is_a_clear_error():
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.spare = nn.Linear(1, 1).double(), nn.Tanh()

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.body(x)

    learner = fastmeta.DAML(WithSpare(), adaptation_loss=lambda out, h: (out * h.sum()).mean(),
                            inner_lr=0.1, features=("spare",))
    with pytest.raises(ValueError, match=r"features \['spare'\] produced no output"):
        learner.adapt(torch.randn(3, 1, dtype=torch.float64))


def test_constructor_errors_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="DAML cannot be first-order.*Drop first_order"):
        daml(first_order=True)
    with pytest.raises(ValueError, match=r"features contains 'body.9'.*named_modules"):
        fastmeta.DAML(tiny_mlp(), adaptation_loss=LossNet(), inner_lr=0.1, features=("body.9",))
    with pytest.raises(TypeError, match=r"features must be a sequence.*features=\('1',\)"):
        fastmeta.DAML(tiny_mlp(), adaptation_loss=LossNet(), inner_lr=0.1, features="1")
    with pytest.raises(TypeError, match="adaptation_loss must be an nn.Module or a callable"):
        fastmeta.DAML(tiny_mlp(), adaptation_loss=3, inner_lr=0.1)
    with pytest.raises(ValueError, match="inner_lr must be > 0"):
        fastmeta.DAML(tiny_mlp(), adaptation_loss=LossNet(), inner_lr=0.0)


def test_missing_support_inputs_is_a_clear_error():
    task = make_task(dtype=torch.float64)
    with pytest.raises(KeyError, match="batch has no support set"):
        daml().meta_loss({"test": [task.query_x, task.query_y]})
    with pytest.raises(ValueError, match=r"batch\['train'\] must be a pair.*\[inputs\] alone"):
        daml().meta_loss({"train": [], "test": [task.query_x, task.query_y]})
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        daml().adapt([[0.0]])


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_learners_without_learned_loss_refuse_unlabelled_support_sets(engine):
    learner = fastmeta.MAML(tiny_mlp(), inner_lr=0.1, engine=engine)
    with pytest.raises(ValueError, match=r"support set has no targets.*adapt\(x, y\).*DAML"):
        learner.adapt(torch.randn(3, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="MAML's inner loss loss_fn.*needs them"):
        learner.meta_step(unlabelled(make_task(dtype=torch.float64)),
                          torch.optim.SGD(learner.parameters(), lr=0.1))


def test_unlabelled_query_set_is_still_an_error():
    task = make_task(dtype=torch.float64)
    with pytest.raises(ValueError, match=r"batch\['test'\] must be a pair"):
        daml().meta_loss({"train": [task.support_x], "test": [task.query_x]})


# ---------------------------------------------------------------- the experiment


def test_run_daml_writes_results_and_a_checkpoint(tmp_path):
    from fastmeta.bench.daml import DamlConfig, run_daml

    config = DamlConfig(iterations=4, eval_tasks=20, checkpoint_every=2)
    results = run_daml(config, tmp_path, progress=False, log=lambda _: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    entry = saved["algorithms"]["daml"]
    assert saved["config"]["iterations"] == 4 and entry["evaluation"]["tasks"] == 20
    assert entry["evaluation"]["l1"]["mean"] == pytest.approx(
        results["algorithms"]["daml"]["evaluation"]["l1"]["mean"])
    assert {"torch", "fastmeta", "python"} <= set(saved["versions"])
    assert entry["training"]["seconds"] > 0 and entry["training"]["iterations"] == 4
    assert "| mean L1 on the grid, after adaptation |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "daml_sine.png").stat().st_size > 10_000
    assert (tmp_path / "checkpoints" / "daml.pt").is_file()


def test_daml_batches_are_the_loaders_batches_as_a_pure_function_of_the_iteration():
    from fastmeta.bench import daml
    from fastmeta.data import BatchMetaDataLoader

    config = daml.DamlConfig(meta_batch_size=7)
    tasks = fastmeta.data.DomainShiftSinusoid(1, 4, num_tasks=daml.NUM_TRAINING_TASKS, seed=0)
    loader = BatchMetaDataLoader(tasks, batch_size=7, shuffle=True)
    expected = [b for b, _ in zip(loader, range(5), strict=False)]
    batch = daml.training_batches(config)
    for i in (4, 0, 2):  # any order: what a resumed run asks for
        got = batch(i)
        assert torch.equal(got["train"][0], expected[i]["train"][0])
        assert torch.equal(got["test"][1], expected[i]["test"][1])


def test_daml_config_errors_name_the_setting():
    from fastmeta.bench.daml import DamlConfig

    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        DamlConfig(iterations=0)
    with pytest.raises(ValueError, match="eval-tasks must be >= 1, got 0"):
        DamlConfig(eval_tasks=0)

"""Every learner (tests/_algorithms.py) on every kind of model fastmeta promises to run;
adapt() is pure."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fastmeta
from tests._algorithms import ALGORITHMS
from tests.conftest import make_task


class LSTMRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2, 6, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.attention = nn.MultiheadAttention(8, num_heads=2, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attention(h, h, h)
        return self.head(h.mean(dim=1))


class WithBuffers(nn.Module):
    """A custom buffer used in forward, and one mutated in place by every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(0.5))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.body = nn.Linear(1, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        self.calls += 1
        return self.head(torch.relu(self.body(x * self.scale)))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.middle = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)
        self.head.weight = self.encoder.weight

    def forward(self, x):
        return self.head(torch.tanh(self.middle(torch.tanh(self.encoder(x)))))


def frozen_mlp() -> nn.Module:
    model = fastmeta.models.SineMLP(hidden=(8, 8))
    model.body[0].requires_grad_(False)
    return model


# name -> (model factory, input shape per example, target shape per example)
MODELS = {
    "mlp": (lambda: fastmeta.models.SineMLP(hidden=(8, 8)), (1,), (1,)),
    "conv4-batchnorm": (
        lambda: fastmeta.models.Conv4(in_channels=1, num_classes=1, hidden=4, image_size=8,
                                      track_running_stats=True),
        (1, 8, 8), (1,)),
    "lstm": (LSTMRegressor, (5, 2), (1,)),
    "attention": (AttentionBlock, (5, 2), (1,)),
    "buffers": (WithBuffers, (1,), (1,)),
    "tied": (TiedWeights, (4,), (4,)),
    "frozen": (frozen_mlp, (1,), (1,)),
}

# LSTM: no batching rule for its fused kernel; WithBuffers: writes into a buffer in place.
VMAP_INCOMPATIBLE = {"lstm", "buffers"}

LEARNERS = {name: algorithm.build for name, algorithm in ALGORITHMS.items()}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    state.update({f"{n}.grad": p.grad.clone() for n, p in model.named_parameters()
                  if p.grad is not None})
    return state


def assert_same(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = snapshot(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize("learner_name", list(LEARNERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_learner_on_every_model(model_name, learner_name):
    torch.manual_seed(0)
    factory, x_shape, y_shape = MODELS[model_name]
    model = factory()
    model.train()
    baseline = ALGORITHMS[learner_name].baseline
    if model_name in VMAP_INCOMPATIBLE and not baseline:  # auto takes higher and says why
        with pytest.warns(UserWarning, match="engine='auto' uses the 'higher' engine"):
            learner = LEARNERS[learner_name](model)
            learner.meta_step(make_task(tasks=1, x_shape=x_shape, y_shape=y_shape),
                              torch.optim.SGD(learner.parameters(), lr=0.0))
        assert learner.engine == "higher"
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "engine='auto' uses the 'higher' engine")
            learner = LEARNERS[learner_name](model)
        assert learner.engine == "vmap" or baseline
    task = make_task(tasks=2, shots=4, query=3, x_shape=x_shape, y_shape=y_shape)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    result = learner.meta_step(task, optimizer)

    assert isinstance(result.loss, float) and torch.isfinite(torch.tensor(result.loss))
    assert result.task_losses.shape == (2,)
    assert result.support_losses.shape == (2, ALGORITHMS[learner_name].inner_steps)
    for name, param in learner.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, name
    moved = [n for n, p in learner.named_parameters() if not torch.equal(before[n], p.detach())]
    assert moved, "the outer optimiser changed nothing"
    for name, value in frozen.items():  # frozen: neither adapted nor meta-trained
        assert torch.equal(dict(model.named_parameters())[name], value)
    for name, value in buffers.items():  # buffers never change (a baseline trains them)
        assert baseline or torch.equal(dict(model.named_buffers())[name], value), name

    # adapt is pure (parameters, buffers and .grad bit-identical) and its model runs
    state = snapshot(model)
    with warnings.catch_warnings():
        if baseline:  # its first adapt is where auto meets the model
            warnings.filterwarnings("ignore", "engine='auto' uses the 'higher' engine")
        adapted = learner.adapt(task.support_x[0], task.support_y[0], steps=3)
    assert_same(state, model)
    query = task.query_x[0]
    assert adapted(query).shape == model(query).shape
    for name in frozen:
        assert torch.equal(adapted.params[name], frozen[name])


@pytest.mark.parametrize("engine", ["higher", "vmap"])
def test_adapt_is_pure_for_conv4_batchnorm_in_train_mode_even_inside_no_grad(engine):
    torch.manual_seed(0)
    model = fastmeta.models.Conv4(in_channels=1, num_classes=3, hidden=4, image_size=8,
                                  track_running_stats=True).train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    state = snapshot(model)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    for learner in (fastmeta.MAML(model, inner_lr=0.1, loss_fn="cross_entropy", engine=engine),
                    fastmeta.MetaSGD(model, inner_lr=0.1, loss_fn="cross_entropy",
                                     engine=engine)):
        with torch.no_grad():
            adapted = learner.adapt(x, y, steps=4)
        assert_same(state, model)
        assert adapted.support_losses[-1] < adapted.support_losses[0]
        running = adapted.buffers["features.1.running_mean"]
        # higher's copy updated its own statistics; the vmap engine uses batch statistics
        # without touching any (the outputs in train mode are the same either way)
        moved = not torch.equal(running, model.features[1].running_mean)
        assert moved == (engine == "higher")
        adapted(x)
        assert torch.equal(adapted.buffers["features.1.running_mean"], running)


def test_adapted_model_as_module_matches_the_callable():
    torch.manual_seed(0)
    model = fastmeta.models.SineMLP(hidden=(8,))
    adapted = fastmeta.MAML(model, inner_lr=0.1).adapt(torch.randn(5, 1), torch.randn(5, 1),
                                                       steps=2)
    copy_ = adapted.as_module()
    x = torch.randn(4, 1)
    torch.testing.assert_close(copy_(x), adapted(x))
    assert not torch.equal(copy_(x), model(x))
    assert dict(adapted.named_parameters()).keys() == dict(model.named_parameters()).keys()


def test_zero_adapt_steps_returns_the_meta_parameters():
    model = fastmeta.models.SineMLP(hidden=(8,))
    adapted = fastmeta.MAML(model, inner_lr=0.1).adapt(torch.randn(5, 1), torch.randn(5, 1),
                                                       steps=0)
    assert all(torch.equal(adapted.params[n], p) for n, p in model.named_parameters())


def test_learner_is_a_module_whose_state_dict_round_trips():
    model = fastmeta.models.SineMLP(hidden=(8,))
    learner = fastmeta.MetaSGD(model, inner_lr=0.1)
    state = copy.deepcopy(learner.state_dict())
    assert any(k.startswith("inner_lrs.") for k in state)
    other = fastmeta.MetaSGD(fastmeta.models.SineMLP(hidden=(8,)), inner_lr=0.5)
    other.load_state_dict(state)
    x = torch.randn(3, 1)
    torch.testing.assert_close(other(x), learner(x))
    assert "inner_lr=0.1" in repr(learner)


def test_torchmeta_float64_batch_is_cast_to_the_model_dtype():
    model = fastmeta.models.SineMLP(hidden=(8,))
    learner = fastmeta.MAML(model, inner_lr=0.01)
    task = make_task(dtype=torch.float64)
    batch = {"train": [task.support_x, task.support_y], "test": [task.query_x, task.query_y]}
    result = learner.meta_step(batch, torch.optim.Adam(learner.parameters()))
    assert torch.isfinite(torch.tensor(result.loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("keys", [("train", "test"), ("support", "query")])
def test_mapping_batches_and_task_give_the_same_meta_gradient(keys):
    task = make_task()
    grads = []
    for batch in (task, {keys[0]: [task.support_x, task.support_y],
                         keys[1]: [task.query_x, task.query_y]}):
        torch.manual_seed(0)
        learner = fastmeta.MAML(fastmeta.models.SineMLP(hidden=(8,)), inner_lr=0.01)
        learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=0.0))
        grads.append([p.grad for p in learner.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("factory,shape", [
    (lambda: fastmeta.models.SineMLP(), (7, 1)),
    (lambda: fastmeta.models.SineMLP(hidden=(64, 64), activation="tanh", init="xavier"), (7, 1)),
    (lambda: fastmeta.models.SineMLP(init="fan_in"), (7, 1)),
    (lambda: fastmeta.models.Conv4(in_channels=1, num_classes=5, image_size=28), (7, 1, 28, 28)),
    (lambda: fastmeta.models.ResNet12(num_classes=5, channels=(8, 8, 16, 16)), (7, 3, 32, 32)),
], ids=["sine-mlp", "reptile-mlp", "fan-in-mlp", "conv4-omniglot", "resnet12-small"])
def test_model_zoo_shapes_and_anil_head(factory, shape):
    model = factory()
    out = model(torch.randn(*shape))
    assert out.shape[0] == 7
    fastmeta.ANIL(model, head="head", inner_lr=0.1)  # every backbone names its head "head"


def test_resnet12_meta_step_on_images():
    torch.manual_seed(0)
    model = fastmeta.models.ResNet12(in_channels=1, num_classes=3, channels=(4, 4, 8, 8))
    learner = fastmeta.MAML(model, inner_lr=0.1, loss_fn="cross_entropy")
    task = fastmeta.TaskBatch(torch.randn(2, 6, 1, 16, 16), torch.randint(0, 3, (2, 6)),
                         torch.randn(2, 6, 1, 16, 16), torch.randint(0, 3, (2, 6)))
    result = learner.meta_step(task, torch.optim.Adam(learner.parameters()))
    assert torch.isfinite(torch.tensor(result.loss))

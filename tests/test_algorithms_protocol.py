"""One generic check over every learner of tests/_algorithms.py: engines agree, exact
meta-gradients match finite differences, a saved learner adapts as the original."""

from __future__ import annotations

import pytest
import torch

import fastmeta
from tests._algorithms import ALGORITHMS, seeded
from tests.conftest import make_task


def _mlp() -> torch.nn.Module:
    return fastmeta.models.SineMLP(hidden=(8, 8), activation="tanh")  # smooth, with a head


def _conv4() -> torch.nn.Module:
    return fastmeta.models.Conv4(in_channels=1, num_classes=1, hidden=3, image_size=6,
                                 track_running_stats=False).train()


MODELS = {"mlp": (_mlp, (1,)), "conv4-bn": (_conv4, (1, 6, 6))}
CASES = [(a, m) for a in ALGORITHMS for m in MODELS]


def _grads(learner: fastmeta.MetaLearner) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in learner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algorithm,model_name", CASES, ids=["-".join(c) for c in CASES])
def test_engines_agree(algorithm, model_name):
    factory, x_shape = MODELS[model_name]
    task = make_task(tasks=3, shots=4, query=3, x_shape=x_shape, dtype=torch.float64)
    grads, losses = {}, {}
    for engine in ("higher", "vmap"):
        learner = ALGORITHMS[algorithm].build(seeded(factory), engine=engine)
        torch.manual_seed(1)  # Reptile's minibatches
        result = learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
        grads[engine], losses[engine] = _grads(learner), result.task_losses
    assert grads["vmap"].keys() == grads["higher"].keys()
    for name, expected in grads["higher"].items():
        torch.testing.assert_close(grads["vmap"][name], expected, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(losses["vmap"], losses["higher"], rtol=1e-10, atol=1e-12)


# The smooth model only: Conv-4's ReLU and max-pooling kinks make finite differences
# meaningless for some elements (seen for DAML, on both engines alike).
EXACT = [(a, "mlp") for a in ALGORITHMS if ALGORITHMS[a].exact]


@pytest.mark.parametrize("algorithm,model_name", EXACT, ids=["-".join(c) for c in EXACT])
def test_exact_meta_gradients_match_finite_differences(algorithm, model_name):
    factory, x_shape = MODELS[model_name]
    learner = ALGORITHMS[algorithm].build(seeded(factory), engine="vmap")
    report = fastmeta.gradcheck(learner, make_task(tasks=2, x_shape=x_shape), max_elements=3)
    assert report.ok, str(report)


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_a_saved_learner_adapts_as_the_original(algorithm):
    task = make_task(tasks=2, dtype=torch.float64)
    learner = ALGORITHMS[algorithm].build(seeded(_mlp))
    learner.meta_step(task, torch.optim.Adam(learner.parameters(), lr=0.05))
    state = learner.state_dict()
    fresh = ALGORITHMS[algorithm].build(seeded(_mlp))
    fresh.load_state_dict(state)
    x, y = task.support_x[0], task.support_y[0]
    torch.manual_seed(2)  # Reptile's minibatches
    expected = learner.adapt(x, y)(task.query_x[0])
    torch.manual_seed(2)
    torch.testing.assert_close(fresh.adapt(x, y)(task.query_x[0]), expected, rtol=0, atol=0)

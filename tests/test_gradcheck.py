"""fastmeta.gradcheck: a per-task reference, several step sizes, kinks told from defects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.engines import MetaLosses
from fastmeta.models import Conv4


def _images(tasks: int = 2, ways: int = 5, shots: int = 1, query: int = 2, size: int = 8,
            seed: int = 0) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return fastmeta.TaskBatch(
        torch.randn(tasks, ways * shots, 1, size, size, generator=g),
        labels.repeat(shots).expand(tasks, -1),
        torch.randn(tasks, ways * query, 1, size, size, generator=g),
        labels.repeat(query).expand(tasks, -1),
    )


def _conv4() -> Conv4:
    torch.manual_seed(0)
    return Conv4(in_channels=1, num_classes=5, image_size=8)  # default width: 64 channels


class _CorruptedMAML(fastmeta.MAML):
    """MAML whose meta-gradient of the head's weight is 1.5 times the true one."""

    def meta_gradient(self, task: fastmeta.TaskBatch) -> MetaLosses:
        losses = super().meta_gradient(task)
        grad = self.module.head.weight.grad
        assert grad is not None
        grad.mul_(1.5)
        return losses


def test_conv4_with_relu_maxpool_and_batchnorm_is_not_a_mismatch():
    learner = fastmeta.MAML(_conv4(), inner_lr=0.1, loss_fn="cross_entropy")
    report = fastmeta.gradcheck(learner, _images(), max_elements=2)
    assert not report.mismatch, str(report)
    assert report.verdict in ("ok", "inconclusive")
    assert report.max_reference_error < 1e-9, str(report)


def test_a_corrupted_meta_gradient_on_conv4_is_a_mismatch():
    learner = _CorruptedMAML(_conv4(), inner_lr=0.1, loss_fn="cross_entropy")
    report = fastmeta.gradcheck(learner, _images(), max_elements=1)
    assert report.mismatch and not report.ok
    assert report.reference_errors["module.head.weight"] > 0.3
    assert report.reference_errors["module.head.bias"] < 1e-9
    assert "MISMATCH" in str(report) and "per-task reference" in str(report)


def _kinked_mlp() -> nn.Sequential:
    """1-4-1 ReLU MLP whose first hidden unit sits exactly on its kink at x = 0.5."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight[0, 0] = 1.0
        model[0].bias[0] = -0.5
    return model


def _kinked_task() -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(1)
    support_x = torch.tensor([[[0.5], [1.5], [-1.0], [2.0]]], dtype=torch.float64)
    return fastmeta.TaskBatch(support_x, torch.randn(1, 4, 1, generator=g, dtype=torch.float64),
                              torch.randn(1, 6, 1, generator=g, dtype=torch.float64),
                              torch.randn(1, 6, 1, generator=g, dtype=torch.float64))


def test_a_kink_under_the_step_is_inconclusive_not_a_mismatch():
    learner = fastmeta.MAML(_kinked_mlp(), inner_lr=0.5, inner_steps=1)
    report = fastmeta.gradcheck(learner, _kinked_task(), max_elements=4)
    assert report.verdict == "inconclusive", str(report)
    assert report.kinks["module.0.bias"] >= 1 and not any(report.mismatched.values())
    assert report.non_smooth == ("relu",)
    assert "INCONCLUSIVE: non-smooth model (relu)" in str(report)
    assert not report.ok and not report.mismatch


def test_a_corrupted_meta_gradient_at_a_kink_stays_a_mismatch():
    class Corrupted(fastmeta.MAML):
        def meta_gradient(self, task: fastmeta.TaskBatch) -> MetaLosses:
            losses = super().meta_gradient(task)
            for p in self.parameters():
                assert p.grad is not None
                p.grad.mul_(1.5)
            return losses

    report = fastmeta.gradcheck(Corrupted(_kinked_mlp(), inner_lr=0.5), _kinked_task(),
                                max_elements=4)
    assert report.mismatch, str(report)


@pytest.mark.parametrize("name,value", [("eps", 0.0), ("tolerance", -1e-5)])
def test_gradcheck_rejects_non_positive_steps_and_tolerances(name, value):
    learner = fastmeta.MAML(_kinked_mlp(), inner_lr=0.5)
    with pytest.raises(ValueError, match=rf"{name} must be a positive number, got {value!r}"):
        fastmeta.gradcheck(learner, _kinked_task(), **{name: value})


@pytest.mark.slow
def test_conv4_at_the_omniglot_shape_with_every_default_is_not_a_mismatch():
    """About 3 minutes on one core. With one central difference at eps = 1e-6 this
    configuration read MISMATCH (relative error 1.0 on module.features.0.weight): the step
    crossed a kink; the other step sizes do not."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).expand(2, -1)
    batch = fastmeta.TaskBatch(torch.randn(2, 5, 1, 28, 28, generator=g), labels,
                               torch.randn(2, 5, 1, 28, 28, generator=g), labels)
    torch.manual_seed(0)
    learner = fastmeta.MAML(Conv4(in_channels=1, image_size=28), inner_lr=0.1,
                            loss_fn="cross_entropy")
    report = fastmeta.gradcheck(learner, batch)
    assert not report.mismatch, str(report)

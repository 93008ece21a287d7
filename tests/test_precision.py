"""Mixed precision (``precision=``): meta-gradients within the precision's rounding of the
float32 ones on the main layer families, float32 master weights, fp16 loss scaling and
skipped steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta._precision import MAX_SKIPPED_IN_A_ROW, check_precision
from tests._algorithms import ALGORITHMS
from tests._zoo import ZOO, draw_task

BF16_EPS, FP16_EPS = 2.0**-8, 2.0**-11  # unit roundoff (half an ulp at 1) of each format
FAMILIES = ["Linear", "Conv2d", "BatchNorm2d-train", "LayerNorm", "GroupNorm",
            "MultiheadAttention", "TransformerEncoderLayer", "Embedding-padding_idx", "GRU"]


def _task(name: str) -> fastmeta.TaskBatch:
    task = draw_task(ZOO[name], tasks=4, shots=8, query=8)
    return fastmeta.TaskBatch(*(t.float() if t.is_floating_point() else t for t in task))


def _meta_gradient(name: str, engine: str, precision: str) -> tuple[torch.Tensor, int]:
    """The float32 model's meta-gradient (flattened) and the fp16 steps skipped first."""
    entry = ZOO[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto's notes on layers it runs with higher
        learner = fastmeta.MAML(entry.build().float(), inner_lr=0.1, inner_steps=2,
                                engine=engine, precision=precision,
                                loss_fn="cross_entropy" if entry.classes else "mse")
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
        for _ in range(MAX_SKIPPED_IN_A_ROW):
            if not learner.meta_step(_task(name), optimizer).skipped:
                break
    grads = [p.grad for p in learner.parameters() if p.grad is not None]
    assert all(g.dtype == torch.float32 for g in grads)
    assert all(p.dtype == torch.float32 for p in learner.parameters())
    return torch.cat([g.flatten() for g in grads]), learner.skipped_steps


@pytest.mark.parametrize("engine", ["auto", "loop"])
@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_meta_gradient_is_the_fp32_one_within_bf16_rounding(name, engine):
    exact, _ = _meta_gradient(name, engine, "fp32")
    bf16, _ = _meta_gradient(name, engine, "bf16")
    error = float((bf16 - exact).norm() / exact.norm())
    assert 0 < error <= 5 * BF16_EPS  # 0 would mean autocast never ran


@pytest.mark.parametrize("name", ["Linear", "Conv2d", "BatchNorm2d-train", "LayerNorm"])
def test_fp16_meta_gradient_is_unscaled_and_the_fp32_one_within_fp16_rounding(name):
    exact, _ = _meta_gradient(name, "auto", "fp32")
    fp16, skipped = _meta_gradient(name, "auto", "fp16")
    assert skipped < MAX_SKIPPED_IN_A_ROW - 1  # it found a scale that fits
    error = float((fp16 - exact).norm() / exact.norm())
    assert 0 < error <= 10 * FP16_EPS


class _Overflow(nn.Module):
    """Finite in float32, beyond float16's range (65504) inside the inner loop."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.scale)

    scale = 1e5


def _overflow_task() -> fastmeta.TaskBatch:
    return fastmeta.TaskBatch(*(torch.ones(2, 3, 1) for _ in range(4)))


def test_an_fp16_overflow_skips_the_step_halves_the_scale_and_is_reported():
    learner = fastmeta.MAML(_Overflow(), inner_lr=1e-12, engine="vmap", precision="fp16")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in learner.named_parameters()}
    scale = float(learner._loss_scaler.scale)
    result = learner.meta_step(_overflow_task(), optimizer)
    assert result.skipped and learner.skipped_steps == 1
    assert float(learner._loss_scaler.scale) == scale / 2
    assert all(torch.equal(p, before[n]) for n, p in learner.named_parameters())
    assert all(p.grad is None for p in learner.parameters())
    learner.module.scale = 1.0  # in range again: the next step updates the weights
    assert not learner.meta_step(_overflow_task(), optimizer).skipped
    assert not torch.equal(learner.module.linear.weight, before["module.linear.weight"])


def test_fp16_overflow_in_every_step_ends_in_a_divergence_error():
    learner = fastmeta.MAML(_Overflow(), inner_lr=1e-12, engine="vmap", precision="fp16")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        assert learner.meta_step(_overflow_task(), optimizer).skipped
    with pytest.raises(fastmeta.DivergenceError, match="not finite"):
        learner.meta_step(_overflow_task(), optimizer)


def test_the_same_overflow_in_float32_is_finite_and_not_skipped():
    learner = fastmeta.MAML(_Overflow(), inner_lr=1e-12, engine="vmap")
    result = learner.meta_step(_overflow_task(), torch.optim.SGD(learner.parameters(), lr=0.1))
    assert not result.skipped and learner.skipped_steps == 0


def test_adapt_in_bf16_keeps_float32_weights_and_leaves_the_model_alone():
    model = fastmeta.models.SineMLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    learner = fastmeta.MAML(model, inner_lr=0.01, precision=torch.bfloat16)
    assert learner.precision == "bf16"
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    adapted = learner.adapt(x, y, steps=3)
    assert all(p.dtype == torch.float32 for p in adapted.params.values())
    exact = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01)
    exact.load_state_dict(learner.state_dict())
    reference = exact.adapt(x, y, steps=3)
    for n, p in adapted.params.items():
        assert not torch.equal(p, reference.params[n]) or n.endswith("bias")
        torch.testing.assert_close(p, reference.params[n], rtol=5 * BF16_EPS, atol=1e-4)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_precision_can_be_changed_after_construction():
    learner = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01)
    assert learner.precision == "fp32" and learner._loss_scaler is None
    learner.precision = "float16"
    assert learner.precision == "fp16" and learner._loss_scaler is not None


@pytest.mark.parametrize("value", ["fp8", "int8", torch.int32, 16, None])
def test_an_unknown_precision_names_the_choices(value):
    with pytest.raises(ValueError, match=r"precision must be one of 'fp32', 'bf16', 'fp16'.*got"):
        fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01, precision=value)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_learner_takes_precision(name):
    learner = ALGORITHMS[name].build(fastmeta.models.SineMLP(), precision="bf16")
    assert learner.precision == "bf16"
    task = fastmeta.TaskBatch(*(torch.randn(2, 5, 1) for _ in range(4)))
    result = learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.01))
    assert torch.isfinite(torch.tensor(result.loss)) and not result.skipped


def test_check_precision_accepts_names_aliases_and_dtypes():
    assert [check_precision(v) for v in ("FP32", "bfloat16", torch.float16, "half")] == [
        "fp32", "bf16", "fp16", "fp16"]


@pytest.mark.parametrize("fused", [True, False])
def test_the_finiteness_check_is_exact_per_entry_with_or_without_the_fused_kernel(
        fused, monkeypatch):
    from fastmeta._precision import unscale_and_check

    if not fused:  # a backend without GradScaler's kernel
        def missing(*args: object) -> None:
            raise NotImplementedError("no kernel here")

        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", missing)
    huge = [torch.full((3,), 3e38), torch.full((2,), 3e38)]  # finite; their sum is not
    assert unscale_and_check(huge)
    assert not unscale_and_check([torch.ones(2), torch.tensor([1.0, float("nan")])])
    assert not unscale_and_check([torch.tensor([float("-inf")], dtype=torch.float64)])
    halves = [torch.full((2,), 4.0), torch.full((1,), 8.0, dtype=torch.float64)]
    assert unscale_and_check(halves, torch.tensor(0.5))
    assert halves[0].tolist() == [2.0, 2.0] and halves[1].tolist() == [4.0]

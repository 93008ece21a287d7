"""The sine family: batch layout, presets and sign conventions, layouts, determinism, workers."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from fastmeta.data import (
    SINUSOID_PRESETS,
    BatchMetaDataLoader,
    ClassSplitter,
    Harmonic,
    LinearTask,
    Sinusoid,
    SinusoidAndLine,
    SinusoidTask,
    sinusoid,
)


def _tasks(dataset: Sinusoid, count: int) -> list[SinusoidTask]:
    return [dataset[i] for i in range(count)]


def _first_batches(loader: BatchMetaDataLoader, count: int) -> list[OrderedDict]:
    return [batch for batch, _ in zip(loader, range(count), strict=False)]


def test_sinusoid_batch_matches_torchmeta_layout() -> None:
    batch = next(iter(BatchMetaDataLoader(sinusoid(10, test_shots=15, seed=0), batch_size=25)))
    assert isinstance(batch, OrderedDict) and list(batch) == ["train", "test"]
    assert isinstance(batch["train"], list) and len(batch["train"]) == 2
    assert batch["train"][0].shape == batch["train"][1].shape == (25, 10, 1)
    assert batch["test"][0].shape == batch["test"][1].shape == (25, 15, 1)
    assert all(t.dtype == torch.float32 for split in batch.values() for t in split)
    double = next(iter(BatchMetaDataLoader(sinusoid(2, seed=0, dtype=torch.float64), batch_size=2)))
    assert double["test"][1].dtype == torch.float64


def test_support_query_keys() -> None:
    splitter = ClassSplitter(num_support_per_class=5, num_query_per_class=3)
    dataset = Sinusoid(8, dataset_transform=splitter, seed=0)
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=2)))
    assert list(batch) == ["support", "query"] and batch["query"][0].shape == (2, 3, 1)


@pytest.mark.parametrize(
    ("preset", "phase_high", "sign"),
    [("maml", math.pi, -1), ("reptile", 2 * math.pi, 1)],
    ids=["maml", "reptile"],
)
def test_presets_cover_ranges_and_follow_their_sign(
    preset: str, phase_high: float, sign: int
) -> None:
    tasks = _tasks(Sinusoid(20, preset=preset, seed=0, dtype=torch.float64), 2000)
    amplitudes = torch.tensor([t.amplitude for t in tasks])
    phases = torch.tensor([t.phase for t in tasks])
    assert 0.1 <= amplitudes.min() < 0.2 and 4.9 < amplitudes.max() <= 5.0
    assert abs(amplitudes.mean().item() - 2.55) < 0.15
    assert 0 <= phases.min() < 0.05 * phase_high and 0.95 * phase_high < phases.max() <= phase_high
    inputs = torch.cat([t.inputs for t in tasks])
    assert -5 <= inputs.min() < -4.9 and 4.9 < inputs.max() <= 5
    for task in tasks[:50]:
        expected = task.amplitude * torch.sin(task.inputs + sign * task.phase)
        other = task.amplitude * torch.sin(task.inputs - sign * task.phase)
        assert torch.allclose(task.targets, expected, atol=1e-12)
        if 0.3 < task.phase % math.pi < math.pi - 0.3 and task.amplitude > 0.5:
            assert not torch.allclose(task.targets, other, atol=1e-3)


def test_maml_preset_is_the_default_and_matches_torchmeta_convention() -> None:
    assert SINUSOID_PRESETS["maml"]["phase_sign"] == -1
    task = Sinusoid(5, seed=3)[0]
    assert torch.allclose(task.targets, task.amplitude * torch.sin(task.inputs - task.phase))


def test_fixed_amplitude_preset_is_plus_or_minus_sin() -> None:
    tasks = _tasks(Sinusoid(4, preset="fixed_amplitude", seed=0), 200)
    assert {t.amplitude for t in tasks} == {1.0}
    assert {round(t.phase, 6) for t in tasks} == {0.0, round(math.pi, 6)}
    for task in tasks:
        sign = 1.0 if task.phase == 0 else -1.0
        assert torch.allclose(task.targets, sign * torch.sin(task.inputs), atol=1e-6)
        assert task.inputs.abs().max() <= 2 * math.pi


def test_robustness_layout_support_subrange_and_query_grid() -> None:
    dataset = sinusoid(5, test_shots=50, support_range=(0, 5), query_grid=True, seed=0)
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=8)))
    support_x, query_x = batch["train"][0], batch["test"][0]
    assert support_x.shape == (8, 5, 1) and query_x.shape == (8, 50, 1)
    assert support_x.min() >= 0 and support_x.max() <= 5
    grid = torch.linspace(-5, 5, 50).reshape(1, 50, 1).expand(8, 50, 1)
    assert torch.allclose(query_x, grid)
    random_query = sinusoid(5, test_shots=20, support_range=(0, 5), seed=0)[0]["test"]
    assert random_query.dataset.inputs[5:].min() < 0  # query covers the whole range


def test_same_seed_same_tasks_other_seed_other_tasks() -> None:
    a = _first_batches(BatchMetaDataLoader(sinusoid(5, seed=7), batch_size=4), 3)
    b = _first_batches(BatchMetaDataLoader(sinusoid(5, seed=7), batch_size=4), 3)
    c = _first_batches(BatchMetaDataLoader(sinusoid(5, seed=8), batch_size=4), 3)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x["train"][0], y["train"][0]) and torch.equal(x["test"][1], y["test"][1])
        assert not torch.equal(x["train"][0], z["train"][0])


def test_two_workers_reproduce_single_process_and_differ_from_each_other() -> None:
    def run(workers: int) -> list[OrderedDict]:
        dataset = sinusoid(5, seed=11, num_tasks=64)
        loader = BatchMetaDataLoader(dataset, batch_size=4, num_workers=workers)
        return _first_batches(loader, 4)  # batches alternate between the two workers

    single, parallel = run(0), run(2)
    for x, y in zip(single, parallel, strict=True):
        assert torch.equal(x["train"][0], y["train"][0]) and torch.equal(x["test"][1], y["test"][1])
    inputs = torch.cat([b["train"][0].flatten() for b in parallel])
    assert inputs.unique().numel() == inputs.numel()  # no worker repeats another's inputs


def test_each_epoch_redraws_inputs_but_keeps_task_parameters() -> None:
    dataset = sinusoid(5, seed=2, num_tasks=8)
    loader = BatchMetaDataLoader(dataset, batch_size=8, shuffle=False)
    first, second = next(iter(loader)), next(iter(loader))
    assert not torch.equal(first["train"][0], second["train"][0])
    dataset.set_epoch(0)
    again = dataset[0]["train"].dataset
    dataset.set_epoch(1)
    later = dataset[0]["train"].dataset
    assert (again.amplitude, again.phase) == (later.amplitude, later.phase)
    assert torch.equal(again.inputs[:5], first["train"][0][0])


def test_noise_changes_targets_not_inputs() -> None:
    clean = Sinusoid(500, num_tasks=1, seed=4, dtype=torch.float64)[0]
    noisy = Sinusoid(500, num_tasks=1, seed=4, noise_std=0.1, dtype=torch.float64)[0]
    assert torch.equal(clean.inputs, noisy.inputs)
    assert abs((noisy.targets - clean.targets).std().item() - 0.1) < 0.015


def test_harmonic_and_sinusoid_and_line_follow_their_formulas() -> None:
    harmonic = Harmonic(30, seed=0, dtype=torch.float64)[3]
    w, (a1, a2), (b1, b2) = harmonic.frequency, harmonic.amplitudes, harmonic.phases
    x = harmonic.inputs
    expected = a1 * torch.sin(w * x + b1) + a2 * torch.sin(2 * w * x + b2)
    assert torch.allclose(harmonic.targets, expected) and 5 <= w <= 7
    tasks = [SinusoidAndLine(6, seed=0, dtype=torch.float64)[i] for i in range(400)]
    lines = [t for t in tasks if isinstance(t, LinearTask)]
    assert 150 < len(lines) < 250
    for task in tasks[:40]:
        assert torch.allclose(task.targets, task.evaluate(task.inputs))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"amplitude_range": (5.0, 0.1)}, ValueError, r"amplitude_range=\(5.0, 0.1\) is an empty"),
        ({"input_range": (1.0, 1.0)}, ValueError, r"input_range=\(1.0, 1.0\) is an empty range"),
        ({"phase_sign": 2}, ValueError, "phase_sign must be -1 .* or \\+1 .*got 2"),
        ({"preset": "finn"}, ValueError, "preset must be one of .*got 'finn'"),
        ({"query_grid": True}, ValueError, "need num_support"),
        ({"num_support": 9}, ValueError, "num_support=9 leaves no query samples"),
        ({"phase_choices": []}, ValueError, "phase_choices must be a non-empty list"),
        ({"dtype": torch.int64}, TypeError, "dtype must be a floating torch.dtype"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*64\), got -1"),
    ],
    ids=["amplitude", "input", "sign", "preset", "grid", "support", "choices", "dtype", "seed"],
)
def test_bad_sinusoid_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Sinusoid(9, **kwargs)


def test_helper_errors() -> None:
    with pytest.raises(ValueError, match="test_shots must be >= 1, got 0"):
        sinusoid(5, test_shots=0)
    with pytest.raises(TypeError, match="sets num_samples_per_task itself"):
        sinusoid(5, num_samples_per_task=10)


def test_fixed_layout_needs_a_matching_splitter() -> None:
    splitter = ClassSplitter(num_train_per_class=3, num_test_per_class=7)
    dataset = Sinusoid(10, num_support=5, query_grid=True, dataset_transform=splitter, seed=0)
    with pytest.raises(ValueError, match=r"fixes its layout .* asks for \[3, 7\]"):
        dataset[0]

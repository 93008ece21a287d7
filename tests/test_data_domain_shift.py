"""DomainShiftSinusoid: the DAML sine tasks of the “Meta Learning in PyTorch” blog post, in
torchmeta's batch layout."""

from __future__ import annotations

import math

import pytest
import torch

import fastmeta
from fastmeta.data import BatchMetaDataLoader, DomainShiftSinusoid, UnlabelledTask


def test_batch_layout_is_unlabelled_support_and_labelled_query():
    batch = next(iter(BatchMetaDataLoader(DomainShiftSinusoid(1, 4, seed=0), batch_size=25)))
    assert list(batch) == ["train", "test"]
    assert len(batch["train"]) == 1 and batch["train"][0].shape == (25, 1, 1)
    assert batch["test"][0].shape == batch["test"][1].shape == (25, 4, 1)
    task = fastmeta._task.as_task(batch)
    assert task.support_y is None and task.num_tasks == 25


def test_source_range_tells_the_phase_and_targets_follow_it():
    dataset = DomainShiftSinusoid(3, 10, num_tasks=400, dtype=torch.float64, seed=1)
    phases = []
    for index in range(len(dataset)):
        task = dataset[index]
        assert isinstance(task["train"], UnlabelledTask) and len(task["train"]) == 3
        source, (x, y) = task["train"].inputs, task["test"][:]
        phase = task["test"].phase
        phases.append(phase)
        low, high = (math.pi / 4, math.pi / 2) if phase == 0 else (-math.pi / 2, -math.pi / 4)
        assert ((source >= low) & (source <= high)).all()
        assert ((x >= -2 * math.pi) & (x <= 2 * math.pi)).all()
        torch.testing.assert_close(y, torch.sin(x + phase))
    assert set(phases) == {0.0, math.pi}
    assert 0.4 < phases.count(math.pi) / len(phases) < 0.6


def test_seeded_epoch_keyed_and_identical_across_workers():
    def first(dataset, **kwargs):  # type: ignore[no-untyped-def]
        loader = BatchMetaDataLoader(dataset, batch_size=8, shuffle=False, **kwargs)
        return next(iter(loader))

    a, b = first(DomainShiftSinusoid(seed=3)), first(DomainShiftSinusoid(seed=3))
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])
    assert not torch.equal(a["train"][0], first(DomainShiftSinusoid(seed=4))["train"][0])
    workers = first(DomainShiftSinusoid(seed=3), num_workers=2)
    assert torch.equal(a["train"][0], workers["train"][0])
    dataset = DomainShiftSinusoid(seed=3)
    dataset.set_epoch(1)  # new inputs, same phases
    assert dataset[0]["test"].phase == DomainShiftSinusoid(seed=3)[0]["test"].phase
    fresh = DomainShiftSinusoid(seed=3)[0]["train"].inputs
    assert not torch.equal(dataset[0]["train"].inputs, fresh)


def test_target_grid_for_evaluation():
    task = DomainShiftSinusoid(1, 200, target_grid=True, seed=0)[5]
    torch.testing.assert_close(
        task["test"].inputs.squeeze(1), torch.linspace(-2 * math.pi, 2 * math.pi, 200)
    )


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"num_source_per_task": 0}, ValueError, "num_source_per_task must be >= 1, got 0"),
    ({"num_target_per_task": 1.5}, TypeError, "num_target_per_task must be an int"),
    ({"source_ranges": [(0, 1)]}, ValueError, "source_ranges must hold two"),
    ({"source_ranges": [(1, 0), (0, 1)]}, ValueError, r"source_ranges\[0\].*empty range"),
    ({"target_range": (2, 2)}, ValueError, "target_range.*empty range"),
], ids=["source-count", "target-count", "one-range", "empty-source", "empty-target"])
def test_bad_arguments_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DomainShiftSinusoid(**kwargs)

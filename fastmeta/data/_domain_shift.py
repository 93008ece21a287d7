"""Domain-shift task families: unlabelled source inputs, labelled target pairs (DAML)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fastmeta.data import _seeding
from fastmeta.data._protocol import Task
from fastmeta.data._toy import (
    NumberedTasks,
    Range,
    SinusoidTask,
    _check_dtype,
    _check_int,
    _check_range,
    _scale,
)


class UnlabelledTask(Task):
    """A task of inputs without targets: ``task[i]`` is the 1-tuple ``(input,)``.

    Collated by ``BatchMetaDataLoader`` into a one-element list ``[inputs]``, which
    fastmeta's learners read as a support set without targets (``support_y=None``).

    Args:
        index: The task's index in its meta-dataset.
        inputs: Inputs, shape ``[num_samples, ...]``.
    """

    _iid_samples = True

    def __init__(self, index: int, inputs: torch.Tensor) -> None:
        super().__init__(index, None)
        self.inputs = inputs

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor]:
        return (self.inputs[index],)

    def _stack(self, indices: Sequence[int]) -> Any:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return (self.inputs.index_select(0, idx),)


_DEFAULT_SOURCE_RANGES: tuple[Range, Range] = (
    (math.pi / 4, math.pi / 2),
    (-math.pi / 2, -math.pi / 4),
)


class DomainShiftSinusoid(NumberedTasks):
    """Domain-adaptive sine tasks (the “Meta Learning in PyTorch” blog post's DAML
    experiment): infer the phase from unlabelled source inputs.

    Task ``index`` has phase ``b`` in ``{0, pi}`` (equally likely), fixed by ``(seed,
    index)``. Its target domain is ``y = sin(x + b)`` on ``x`` in ``target_range``
    (default ``[-2 pi, 2 pi]``); its source domain says which phase without a label: the
    source inputs are drawn from ``source_ranges[0]`` (default ``[pi/4, pi/2]``) for
    ``b = 0`` and from ``source_ranges[1]`` (default ``[-pi/2, -pi/4]``) for ``b = pi``.
    Inputs are redrawn every epoch.

    ``dataset[index]`` is ``OrderedDict(train=UnlabelledTask, test=SinusoidTask)``, so
    ``BatchMetaDataLoader`` gives ``{"train": [source_x], "test": [target_x, target_y]}``
    with shapes ``[batch, num_source_per_task, 1]`` and ``[batch, num_target_per_task, 1]``:
    what :class:`fastmeta.DAML` takes.

    Args:
        num_source_per_task: Unlabelled source inputs per task (the blog post uses 1).
        num_target_per_task: Labelled target pairs per task (the blog post trains with 4).
        num_tasks: Number of distinct tasks.
        source_ranges: ``((low, high) for phase 0, (low, high) for phase pi)``.
        target_range: ``(low, high)`` of the target inputs.
        target_grid: Put the target inputs on an evenly spaced grid over
            ``target_range`` (for evaluation) instead of drawing them.
        dtype: Floating dtype of inputs and targets (default ``torch.float32``).
        seed: Seed of every draw; ``None`` draws one from the OS once.

    Raises:
        ValueError: For counts below 1 or empty ranges.

    Example:
        >>> from fastmeta.data import BatchMetaDataLoader
        >>> batch = next(iter(BatchMetaDataLoader(DomainShiftSinusoid(seed=0), batch_size=25)))
        >>> len(batch["train"]), batch["train"][0].shape, batch["test"][1].shape
        (1, torch.Size([25, 1, 1]), torch.Size([25, 4, 1]))
    """

    def __init__(
        self,
        num_source_per_task: int = 1,
        num_target_per_task: int = 4,
        num_tasks: int = 1_000_000,
        *,
        source_ranges: Sequence[Range] = _DEFAULT_SOURCE_RANGES,
        target_range: Range = (-2 * math.pi, 2 * math.pi),
        target_grid: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        self.num_source_per_task = _check_int("num_source_per_task", num_source_per_task, 1)
        self.num_target_per_task = _check_int("num_target_per_task", num_target_per_task, 1)
        self.num_tasks = _check_int("num_tasks", num_tasks, 1)
        ranges = tuple(source_ranges)
        if len(ranges) != 2:
            raise ValueError(
                f"source_ranges must hold two (low, high) ranges, one for phase 0 and one for "
                f"phase pi, got {source_ranges!r}"
            )
        self.source_ranges = (
            _check_range("source_ranges[0]", ranges[0], allow_point=False),
            _check_range("source_ranges[1]", ranges[1], allow_point=False),
        )
        self.target_range = _check_range("target_range", target_range, allow_point=False)
        self.target_grid = bool(target_grid)
        self.dtype = _check_dtype(dtype)
        super().__init__(meta_split="train", seed=seed)

    def __getitems__(self, indices: Sequence[Any]) -> list[Any]:
        """Build several tasks at once (``DataLoader`` calls this with a batch of indices)."""
        rows = [self._check_index(i) for i in indices]
        s, t = self.num_source_per_task, self.num_target_per_task
        params = _seeding.uniforms(
            [_seeding.hash_key(self._seed, _seeding.STREAM_PARAMS, i) for i in rows], 1
        )
        draws = _seeding.uniforms(
            [_seeding.hash_key(self._seed, _seeding.STREAM_INPUTS, i, self._epoch) for i in rows],
            s + t,
        )
        flipped = params[:, 0] >= 0.5  # phase pi
        phases = np.where(flipped, math.pi, 0.0)
        source = np.where(
            flipped[:, None],
            _scale(draws[:, :s], self.source_ranges[1]),
            _scale(draws[:, :s], self.source_ranges[0]),
        )
        if self.target_grid:
            grid = np.linspace(*self.target_range, t)
            target_x = np.tile(grid, (len(rows), 1))
        else:
            target_x = _scale(draws[:, s:], self.target_range)
        target_y = np.sin(target_x + phases[:, None])

        def tensor(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a.reshape(len(rows), -1, 1)).to(self.dtype)

        source_t, x_t, y_t = tensor(source), tensor(target_x), tensor(target_y)
        tasks = []
        for row, index in enumerate(rows):
            query = SinusoidTask(index, x_t[row], y_t[row])
            query.amplitude, query.phase, query.phase_sign = 1.0, float(phases[row]), 1
            support = UnlabelledTask(index, source_t[row])
            for part in (query, support):
                part._rng_key = self._task_key(index)
            tasks.append(OrderedDict(train=support, test=query))
        return tasks

"""Toy regression task families: ``Sinusoid`` (with the MAML and Reptile papers' presets),
``Harmonic``, ``SinusoidAndLine`` and the ``sinusoid`` helper.

Every task's parameters are a pure function of ``(seed, index)`` and its inputs
(and noise) of ``(seed, index, epoch)``; see ``MetaDataset``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, cast

import numpy as np
import torch

from fastmeta.data import _seeding
from fastmeta.data._protocol import MetaDataset, Task
from fastmeta.data._splitters import ClassSplitter

Range = tuple[float, float]

SINUSOID_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        # Finn et al. 2017, section 5.1 (and torchmeta): y = A sin(x - phase).
        "maml": MappingProxyType(
            {
                "amplitude_range": (0.1, 5.0),
                "phase_range": (0.0, math.pi),
                "phase_choices": None,
                "phase_sign": -1,
                "input_range": (-5.0, 5.0),
            }
        ),
        # Nichol et al. 2018 (Reptile's sine demo): y = A sin(x + phase), phase in [0, 2 pi].
        "reptile": MappingProxyType(
            {
                "amplitude_range": (0.1, 5.0),
                "phase_range": (0.0, 2 * math.pi),
                "phase_choices": None,
                "phase_sign": 1,
                "input_range": (-5.0, 5.0),
            }
        ),
        # Fixed amplitude, phase 0 or pi: y = sin(x + b), b in {0, pi}, x in [-2 pi, 2 pi].
        "fixed_amplitude": MappingProxyType(
            {
                "amplitude_range": (1.0, 1.0),
                "phase_range": None,
                "phase_choices": (0.0, math.pi),
                "phase_sign": 1,
                "input_range": (-2 * math.pi, 2 * math.pi),
            }
        ),
    }
)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_range(name: str, value: object, *, allow_point: bool) -> Range:
    """Validate a ``(low, high)`` pair; ``allow_point`` permits ``low == high``."""
    try:
        low, high = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if high < low or (high == low and not allow_point):
        needed = "low <= high" if allow_point else "low < high"
        raise ValueError(
            f"{name}={value!r} is an empty range; pass (low, high) with {needed}, "
            f"e.g. ({min(low, high)}, {max(low, high) if high != low else low + 1})"
        )
    return (low, high)


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    return dtype


class RegressionTask(Task):
    """A regression task holding its inputs and targets as ``[num_samples, 1]`` tensors.

    Its samples are independent draws, so ``ClassSplitter`` takes them in
    order (a random subset would have the same distribution); with
    ``num_support`` set, the first ``num_support`` samples are the support points.

    Args:
        index: The task's index in its meta-dataset.
        inputs: Inputs, shape ``[num_samples, 1]``.
        targets: Targets, shape ``[num_samples, 1]``.
        transform: Applied to each input on ``__getitem__``.
        target_transform: Applied to each target on ``__getitem__``.
        num_support: Number of leading support samples with their own layout.
    """

    _iid_samples = True

    def __init__(
        self,
        index: int,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        num_support: int | None = None,
    ) -> None:
        super().__init__(index, None, transform, target_transform)
        self.inputs = inputs
        self.targets = targets
        self.num_support = num_support

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        x, y = self.inputs[index], self.targets[index]
        if self.transform is not None:
            x = self.transform(x)
        if self.target_transform is not None:
            y = self.target_transform(y)
        return x, y

    def _stack(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.transform is not None or self.target_transform is not None:
            return None
        if isinstance(indices, range) and indices.step == 1:
            return self.inputs[indices.start : indices.stop], self.targets[
                indices.start : indices.stop
            ]
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.inputs.index_select(0, idx), self.targets.index_select(0, idx)


class SinusoidTask(RegressionTask):
    """A sine task ``y = amplitude * sin(x + phase_sign * phase)`` (plus noise).

    Attributes:
        amplitude: The task's amplitude.
        phase: The task's phase.
        phase_sign: ``-1`` for ``sin(x - phase)`` (MAML), ``+1`` for ``sin(x + phase)``.
    """

    amplitude: float
    phase: float
    phase_sign: int

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The noiseless wave at ``x`` (e.g. a grid, to plot the whole task)."""
        return self.amplitude * torch.sin(x + self.phase_sign * self.phase)


class LinearTask(RegressionTask):
    """A line task ``y = slope * x + intercept`` (plus noise)."""

    slope: float
    intercept: float

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """The noiseless line at ``x``."""
        return self.slope * x + self.intercept


class HarmonicTask(RegressionTask):
    """A ``Harmonic`` task ``y = a1 sin(w x + b1) + a2 sin(2 w x + b2)`` (plus noise).

    Attributes:
        center: Mean of the inputs.
        frequency: Base frequency ``w``.
        phases: ``(b1, b2)``.
        amplitudes: ``(a1, a2)``.
    """

    center: float
    frequency: float
    phases: tuple[float, float]
    amplitudes: tuple[float, float]


class NumberedTasks(MetaDataset):
    """A meta-dataset of ``num_tasks`` tasks built in batches by ``__getitems__``.

    Index ``i`` (negative counts from the end) is checked once here; subclasses build
    tasks from the checked row numbers.
    """

    num_tasks: int

    def __len__(self) -> int:
        return self.num_tasks

    def _check_index(self, index: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"task index must be an int, got {index!r}")
        i = int(index) + self.num_tasks if index < 0 else int(index)
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task index {index} out of range for {self.num_tasks} tasks")
        return i

    def __getitem__(self, index: Any) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[Any]) -> list[Any]:
        raise NotImplementedError


class _ToyRegression(NumberedTasks):
    """Shared plumbing: torchmeta's constructor arguments, validation, task count
    (``_default_num_tasks`` when not given), vectorised per-index draws.

    Subclasses set how many uniforms they use per task (``_param_draws``) and
    per sample (``_sample_draws``), and implement ``_generate``. Two more
    uniforms per sample feed the noise, so noise never changes the inputs.
    """

    _param_draws = 0
    _sample_draws = 0
    _default_num_tasks = 1_000_000
    num_support: int | None = None

    def __init__(
        self,
        num_samples_per_task: int,
        num_tasks: int | None = None,
        noise_std: float | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        self.num_samples_per_task = _check_int("num_samples_per_task", num_samples_per_task, 1)
        self.num_tasks = _check_int(
            "num_tasks", self._default_num_tasks if num_tasks is None else num_tasks, 1)
        if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std must be None or a finite number >= 0, got {noise_std!r}")
        self.noise_std = noise_std
        self.transform = transform
        self.dtype = _check_dtype(dtype)
        super().__init__(
            meta_split="train",
            target_transform=target_transform,
            dataset_transform=dataset_transform,
            seed=seed,
        )

    def __getitems__(self, indices: Sequence[Any]) -> list[Any]:
        """Build several tasks at once (``DataLoader`` calls this with a batch of indices)."""
        rows = [self._check_index(i) for i in indices]
        n = self.num_samples_per_task
        params = _seeding.uniforms(
            [_seeding.hash_key(self._seed, _seeding.STREAM_PARAMS, i) for i in rows],
            self._param_draws,
        )
        draws = _seeding.uniforms(
            [_seeding.hash_key(self._seed, _seeding.STREAM_INPUTS, i, self._epoch) for i in rows],
            (self._sample_draws + 2) * n,
        )
        x, y, attributes = self._generate(params, draws[:, : self._sample_draws * n])
        if self.noise_std:
            noise = _seeding.normals(draws[:, -2 * n : -n], draws[:, -n:])
            y = y + self.noise_std * noise
        inputs = torch.from_numpy(x.reshape(len(rows), n, 1)).to(self.dtype)
        targets = torch.from_numpy(y.reshape(len(rows), n, 1)).to(self.dtype)
        tasks = []
        for row, (index, (cls, attrs)) in enumerate(zip(rows, attributes, strict=True)):
            task = cls(
                index,
                inputs[row],
                targets[row],
                self.transform,
                self.target_transform,
                self.num_support,
            )
            for name, value in attrs.items():
                setattr(task, name, value)
            tasks.append(self._finish(task))
        return tasks

    def _generate(
        self, params: np.ndarray, draws: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[type[RegressionTask], dict[str, Any]]]]:
        """Return inputs and targets ``[tasks, samples]`` and each task's class and attributes."""
        raise NotImplementedError


def _scale(u: np.ndarray, bounds: Range) -> np.ndarray:
    return bounds[0] + (bounds[1] - bounds[0]) * u


class Sinusoid(_ToyRegression):
    """Sine-wave regression tasks, torchmeta's ``Sinusoid`` with the published variants.

    Task ``index`` has amplitude ``A`` and phase ``phi`` fixed by ``(seed,
    index)``; its ``num_samples_per_task`` inputs ``x`` are redrawn every epoch;
    targets are ``y = A * sin(x + phase_sign * phi)`` (+ Gaussian noise).

    Presets (explicit arguments override them):

    * ``"maml"`` (default, = torchmeta): ``A ~ U[0.1, 5]``, ``phi ~ U[0, pi]``,
      ``y = A sin(x - phi)``, ``x ~ U[-5, 5]``.
    * ``"reptile"``: ``A ~ U[0.1, 5]``, ``phi ~ U[0, 2 pi]``, ``y = A sin(x + phi)``,
      ``x ~ U[-5, 5]`` (evaluate with ``query_grid=True`` and 50 query points).
    * ``"fixed_amplitude"``: ``y = sin(x + b)``, ``b`` in ``{0, pi}``,
      ``x ~ U[-2 pi, 2 pi]``.

    With ``num_support`` set, the first ``num_support`` samples are support
    points drawn from ``support_range`` (default ``input_range``) and the rest
    query points from ``input_range``, or evenly spaced on it if
    ``query_grid``: the robustness test is ``support_range=(0, 5)``.

    Args:
        num_samples_per_task: Samples per task (support + query).
        num_tasks: Number of distinct tasks.
        noise_std: Standard deviation of Gaussian noise added to targets.
        transform: Applied to each input (disables the fast tensor path).
        target_transform: Applied to each target.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        preset: ``"maml"``, ``"reptile"`` or ``"fixed_amplitude"``.
        amplitude_range: ``(low, high)`` of the uniform amplitude (``low == high`` fixes it).
        phase_range: ``(low, high)`` of the uniform phase.
        phase_choices: Draw the phase uniformly from these values instead.
        phase_sign: ``-1`` for ``sin(x - phase)``, ``+1`` for ``sin(x + phase)``.
        input_range: ``(low, high)`` of the inputs (query inputs with ``num_support``).
        support_range: ``(low, high)`` of the support inputs; needs ``num_support``.
        num_support: Number of leading support samples with their own range.
        query_grid: Put the query inputs on an evenly spaced grid; needs ``num_support``.
        dtype: Floating dtype of inputs and targets (default ``torch.float32``).
        seed: Seed of every draw; ``None`` draws one from the OS once.

    Raises:
        ValueError: For empty ranges, unknown presets, or an inconsistent layout.

    Example:
        >>> dataset = Sinusoid(10, preset="reptile", seed=0)
        >>> task = dataset[0]
        >>> x, y = task[0]
        >>> bool(torch.isclose(y, task.amplitude * torch.sin(x + task.phase)))
        True
    """

    _param_draws = 2
    _sample_draws = 1

    def __init__(
        self,
        num_samples_per_task: int,
        num_tasks: int = 1_000_000,
        noise_std: float | None = None,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        dataset_transform: Callable[[Any], Any] | None = None,
        *,
        preset: str = "maml",
        amplitude_range: Range | None = None,
        phase_range: Range | None = None,
        phase_choices: Sequence[float] | None = None,
        phase_sign: int | None = None,
        input_range: Range | None = None,
        support_range: Range | None = None,
        num_support: int | None = None,
        query_grid: bool = False,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        if preset not in SINUSOID_PRESETS:
            raise ValueError(f"preset must be one of {sorted(SINUSOID_PRESETS)}, got {preset!r}")
        if phase_range is not None and phase_choices is not None:
            raise ValueError("pass phase_range or phase_choices, not both")
        settings = dict(SINUSOID_PRESETS[preset])
        if phase_range is not None:
            settings["phase_choices"] = None
        if phase_choices is not None:
            settings["phase_range"] = None
        given = {
            "amplitude_range": amplitude_range,
            "phase_range": phase_range,
            "phase_choices": phase_choices,
            "phase_sign": phase_sign,
            "input_range": input_range,
        }
        settings.update({k: v for k, v in given.items() if v is not None})
        self.preset = preset
        self.amplitude_range = _check_range(
            "amplitude_range", settings["amplitude_range"], allow_point=True
        )
        self.phase_range: Range | None = None
        self.phase_choices: tuple[float, ...] | None = None
        if settings["phase_choices"] is not None:
            choices = tuple(float(c) for c in settings["phase_choices"])
            if not choices or not all(math.isfinite(c) for c in choices):
                raise ValueError(
                    f"phase_choices must be a non-empty list of finite phases, "
                    f"got {settings['phase_choices']!r}"
                )
            self.phase_choices = choices
        else:
            self.phase_range = _check_range(
                "phase_range", settings["phase_range"], allow_point=True
            )
        if settings["phase_sign"] not in (-1, 1):
            raise ValueError(
                f"phase_sign must be -1 (y = A sin(x - phase)) or +1 (y = A sin(x + phase)), "
                f"got {settings['phase_sign']!r}"
            )
        self.phase_sign = int(settings["phase_sign"])
        self.input_range = _check_range("input_range", settings["input_range"], allow_point=False)
        self.support_range = (
            None
            if support_range is None
            else _check_range("support_range", support_range, allow_point=False)
        )
        self.query_grid = bool(query_grid)
        super().__init__(
            num_samples_per_task,
            num_tasks,
            noise_std,
            transform,
            target_transform,
            dataset_transform,
            dtype=dtype,
            seed=seed,
        )
        self.num_support = self._check_layout(num_support)

    def _check_layout(self, num_support: int | None) -> int | None:
        if num_support is None:
            if self.support_range is not None or self.query_grid:
                raise ValueError(
                    "support_range and query_grid need num_support (how many leading samples are "
                    "support points); the sinusoid() helper sets it to shots"
                )
            return None
        num_support = _check_int("num_support", num_support, 1)
        if num_support >= self.num_samples_per_task:
            raise ValueError(
                f"num_support={num_support} leaves no query samples out of "
                f"num_samples_per_task={self.num_samples_per_task}; raise num_samples_per_task"
            )
        return num_support

    def _generate(
        self, params: np.ndarray, draws: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[type[RegressionTask], dict[str, Any]]]]:
        amplitudes = _scale(params[:, 0], self.amplitude_range)
        if self.phase_choices is not None:
            which = np.minimum(
                (params[:, 1] * len(self.phase_choices)).astype(np.int64),
                len(self.phase_choices) - 1,
            )
            phases = np.asarray(self.phase_choices)[which]
        else:
            phases = _scale(params[:, 1], cast(Range, self.phase_range))
        x = self._inputs(draws)
        y = amplitudes[:, None] * np.sin(x + self.phase_sign * phases[:, None])
        attributes: list[tuple[type[RegressionTask], dict[str, Any]]] = [
            (
                SinusoidTask,
                {"amplitude": float(a), "phase": float(p), "phase_sign": self.phase_sign},
            )
            for a, p in zip(amplitudes, phases, strict=True)
        ]
        return x, y, attributes

    def _inputs(self, u: np.ndarray) -> np.ndarray:
        k = self.num_support
        if k is None:
            return _scale(u, self.input_range)
        support = _scale(u[:, :k], self.support_range or self.input_range)
        if self.query_grid:
            grid = np.linspace(*self.input_range, self.num_samples_per_task - k)
            query = np.broadcast_to(grid, (u.shape[0], grid.size))
        else:
            query = _scale(u[:, k:], self.input_range)
        return np.concatenate([support, query], axis=1)


class Harmonic(_ToyRegression):
    """Sums of two harmonics (Lacoste et al. 2018), torchmeta's ``Harmonic``.

    ``y = a1 sin(w x + b1) + a2 sin(2 w x + b2)`` with ``w ~ U[5, 7]``,
    ``b1, b2 ~ U[0, 2 pi]``, ``a1, a2 ~ N(0, 1)``; inputs ``x ~ N(mu, 1)`` with
    ``mu ~ U[-4, 4]`` per task.

    Args:
        num_samples_per_task: Samples per task.
        num_tasks: Number of distinct tasks (default 5000).
        noise_std: Standard deviation of Gaussian noise added to targets.
        transform: Applied to each input.
        target_transform: Applied to each target.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        dtype: Floating dtype of inputs and targets.
        seed: Seed of every draw.

    Example:
        >>> len(Harmonic(8, seed=0)[0])
        8
    """

    _param_draws = 8
    _sample_draws = 2
    _default_num_tasks = 5000

    def _generate(
        self, params: np.ndarray, draws: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[type[RegressionTask], dict[str, Any]]]]:
        n = self.num_samples_per_task
        center = _scale(params[:, 0], (-4.0, 4.0))
        frequency = _scale(params[:, 1], (5.0, 7.0))
        phases = _scale(params[:, 2:4], (0.0, 2 * math.pi))
        amplitudes = _seeding.normals(params[:, 4:6], params[:, 6:8])
        x = center[:, None] + _seeding.normals(draws[:, :n], draws[:, n:])
        w = frequency[:, None]
        y = amplitudes[:, :1] * np.sin(w * x + phases[:, :1]) + amplitudes[:, 1:] * np.sin(
            2 * w * x + phases[:, 1:]
        )
        attributes: list[tuple[type[RegressionTask], dict[str, Any]]] = [
            (
                HarmonicTask,
                {
                    "center": float(center[b]),
                    "frequency": float(frequency[b]),
                    "phases": (float(phases[b, 0]), float(phases[b, 1])),
                    "amplitudes": (float(amplitudes[b, 0]), float(amplitudes[b, 1])),
                },
            )
            for b in range(len(params))
        ]
        return x, y, attributes


class SinusoidAndLine(_ToyRegression):
    """Sines or lines (Finn et al. 2018, probabilistic MAML), torchmeta's ``SinusoidAndLine``.

    Each task is, with probability 1/2, a ``SinusoidTask`` (``A ~ U[0.1, 5]``,
    ``phi ~ U[0, pi]``, ``y = A sin(x - phi)``) or a ``LinearTask`` (slope and
    intercept ``~ U[-3, 3]``); ``x ~ U[-5, 5]``.

    Args:
        num_samples_per_task: Samples per task.
        num_tasks: Number of distinct tasks (default 1,000,000).
        noise_std: Standard deviation of Gaussian noise added to targets.
        transform: Applied to each input.
        target_transform: Applied to each target.
        dataset_transform: Applied to each task, e.g. ``ClassSplitter(...)``.
        dtype: Floating dtype of inputs and targets.
        seed: Seed of every draw.

    Example:
        >>> kinds = {type(SinusoidAndLine(4, seed=0)[i]).__name__ for i in range(20)}
        >>> sorted(kinds)
        ['LinearTask', 'SinusoidTask']
    """

    _param_draws = 3
    _sample_draws = 1

    def _generate(
        self, params: np.ndarray, draws: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[type[RegressionTask], dict[str, Any]]]]:
        is_sine = params[:, 0] < 0.5
        amplitude, phase = _scale(params[:, 1], (0.1, 5.0)), _scale(params[:, 2], (0.0, math.pi))
        slope, intercept = _scale(params[:, 1], (-3.0, 3.0)), _scale(params[:, 2], (-3.0, 3.0))
        x = _scale(draws, (-5.0, 5.0))
        sine = amplitude[:, None] * np.sin(x - phase[:, None])
        line = slope[:, None] * x + intercept[:, None]
        y = np.where(is_sine[:, None], sine, line)
        attributes: list[tuple[type[RegressionTask], dict[str, Any]]] = [
            (
                SinusoidTask,
                {"amplitude": float(amplitude[b]), "phase": float(phase[b]), "phase_sign": -1},
            )
            if is_sine[b]
            else (LinearTask, {"slope": float(slope[b]), "intercept": float(intercept[b])})
            for b in range(len(params))
        ]
        return x, y, attributes


def sinusoid(
    shots: int,
    test_shots: int | None = None,
    shuffle: bool = True,
    seed: int | None = None,
    **kwargs: Any,
) -> Sinusoid:
    """Sine tasks split into ``shots`` train and ``test_shots`` test points (torchmeta's helper).

    Args:
        shots: Support (``"train"``) points per task: the K of K-shot.
        test_shots: Query (``"test"``) points per task; defaults to ``shots``.
        shuffle: Let ``ClassSplitter`` pick the points at random (tasks with a
            fixed layout, see ``support_range``/``query_grid``, split in order).
        seed: Seed of every draw; ``None`` draws one from the OS once.
        **kwargs: Passed to ``Sinusoid``: ``preset``, ``noise_std``,
            ``num_tasks``, ranges, ``support_range``, ``query_grid``, ``dtype``...
            ``num_support`` is set to ``shots`` when a layout is asked for.

    Returns:
        A ``Sinusoid`` whose tasks are ``OrderedDict(train=..., test=...)``.

    Example:
        >>> robustness = sinusoid(5, test_shots=50, support_range=(0, 5), query_grid=True, seed=0)
        >>> task = robustness[0]
        >>> float(task["train"].dataset.inputs[:5].min()) >= 0.0
        True
    """
    shots = _check_int("shots", shots, 1)
    test_shots = shots if test_shots is None else _check_int("test_shots", test_shots, 1)
    for name in ("num_samples_per_task", "dataset_transform"):
        if name in kwargs:
            raise TypeError(f"sinusoid() sets {name} itself from shots and test_shots; drop it")
    if kwargs.get("support_range") is not None or kwargs.get("query_grid"):
        kwargs.setdefault("num_support", shots)
    splitter = ClassSplitter(
        shuffle=shuffle, num_train_per_class=shots, num_test_per_class=test_shots
    )
    return Sinusoid(shots + test_shots, dataset_transform=splitter, seed=seed, **kwargs)

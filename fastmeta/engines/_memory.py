"""Memory as a budget: what one task costs, what each engine would need, what fits.

``engine="auto"`` runs nothing large before it knows its cost:

1. **Footprint.** Once per batch shape, the per-task engine runs the meta-objective of
   *one* task (forward and inner steps, no backward) while
   ``torch.autograd.graph.saved_tensors_hooks`` counts the bytes autograd keeps for the
   backward pass (each storage once, the parameters and the batch not counted). That works
   the same on every device.
2. **Prediction.** The per-task engines (``loop``, ``higher``) hold one task's graph at a
   time: :data:`LOOP_FACTOR` × footprint. ``vmap`` holds every task's graph at once, and
   its batched kernels keep a little more per task: :data:`VMAP_FACTOR` × tasks ×
   footprint; ``vmap`` in chunks of ``c`` tasks, ``c`` tasks' worth. Both add the
   meta-gradient and one copy of the adapted weights (2 × the parameters' bytes).
3. **Budget.** ``"auto"`` (the default) is :data:`AUTO_FRACTION` of what the device can
   still give: on CUDA the free memory (``torch.cuda.mem_get_info``) plus what torch's
   caching allocator holds unused; on a CPU the smallest of ``MemAvailable``
   (``/proc/meminfo``), the address-space limit (``RLIMIT_AS``) above the process's size
   (of which :data:`ADDRESS_SPACE_FRACTION` in all), and the cgroup's memory limit above
   its use. An explicit budget is bytes, or a string
   such as ``"6GiB"`` or ``"512MB"``; it counts from the memory in use when the learner
   first ran (what the process kept since is taken from it), and candidates are planned
   to :data:`EXPLICIT_FRACTION` of it. The budget is taken once per batch shape.
4. **Fallback.** An out-of-memory error inside a meta-step (the prediction was wrong)
   frees what it can, undoes any partial ``.grad``, is recorded, and the same meta-step
   runs again on the next candidate with a smaller predicted peak.

The factors were measured with ``benchmarks/scale.py``'s configurations (float32, CPU,
resident-set high-water mark of a meta-step over the footprint): Conv-4 at the Omniglot
shape 1.0 (loop) and 1.7 (``vmap`` on 32 tasks, per task; 1.86 in chunks of 4), at the
miniImageNet shape 1.0 and 1.64, a small Transformer 0.5 and 1.3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import re
import resource
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._task import TaskBatch
from .._tree import index, leaves
from ._base import Adaptation, Engine, InnerLoop, MetaGrad, OuterObjective

LOOP_FACTOR = 1.0
VMAP_FACTOR = 2.0
AUTO_FRACTION = 0.8
# Of an address-space limit (RLIMIT_AS) only this fraction: allocators keep freed ranges
# mapped, so the address space fills before the resident memory does (measured: Conv-4
# chunks predicted at 80% of the headroom ran out of address space).
ADDRESS_SPACE_FRACTION = 0.5
# An explicit budget is planned to this fraction: a step also allocates outside the tensors
# autograd saves (workspaces, the allocator's slack).
EXPLICIT_FRACTION = 0.9

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*$")

# Substrings of the errors torch raises when an allocation fails (CUDA raises
# torch.OutOfMemoryError; the CPU allocator a RuntimeError).
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory")


def parse_memory_budget(value: object) -> int | None:
    """``memory_budget`` in bytes, or ``None`` for ``"auto"``.

    Raises:
        TypeError: not a number of bytes or a string.
        ValueError: a string that is no size, or a budget that is not positive.
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"memory_budget must be 'auto', a number of bytes or a size such as '6GiB' or "
                f"'512MB' (units: {', '.join(u for u in _UNITS if u)}), got {value!r}")
        size = float(match.group(1)) * _UNITS[unit]
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"memory_budget must be 'auto', a number of bytes or a string such "
                        f"as '6GiB', got {value!r}")
    else:
        size = float(value)
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"memory_budget must be at least 1 byte, got {value!r}; pass 'auto' "
                         f"for a safe fraction of the device's free memory")
    return int(size)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (CUDA or CPU)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        marker in str(error).lower() for marker in OUT_OF_MEMORY)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, \
                open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            return None if text == "max" else int(text) - int(used.read())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes ``device`` can still give this process, or ``None`` where nobody says."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + unused)
    if device.type != "cpu":
        return None
    limits = []
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size = _status_bytes("VmSize")
    if soft != resource.RLIM_INFINITY and size is not None:
        limits.append(int((soft - size) * ADDRESS_SPACE_FRACTION / AUTO_FRACTION))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        limits.append(cgroup)
    return max(min(limits), 0) if limits else None


def memory_in_use(device: torch.device) -> int | None:
    """Bytes this process holds on ``device`` (CUDA: allocated tensors; CPU: resident set)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS") if device.type == "cpu" else None


def resolve_budget(budget: int | None, device: torch.device, baseline: int | None = None
                   ) -> int | None:
    """The bytes a meta-step may add to the memory in use now.

    ``budget`` counts from ``baseline`` (the memory in use when the learner first ran), so
    what the process kept since (caches, lazily loaded kernels) is taken from it. For
    ``"auto"`` (``None``): a fraction of :func:`available_memory` now (``None`` where the
    device does not say)."""
    if budget is not None:
        now = memory_in_use(device)
        grown = 0 if baseline is None or now is None else max(now - baseline, 0)
        return max(int(EXPLICIT_FRACTION * budget) - grown, 0)
    available = available_memory(device)
    return None if available is None else int(AUTO_FRACTION * available)


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward while it is active, and their peak.

    Each storage counts once, however many views of it are saved; storages in ``resident``
    (the parameters, the batch: held anyway) do not count. A saved tensor stops counting
    when autograd lets it go (its graph is freed).
    """

    def __init__(self, resident: Iterable[Tensor] = ()) -> None:
        self.resident = {_storage(t)[0] for t in resident}
        self.live = self.peak = 0
        self._counts: dict[int, list[int]] = {}  # storage -> [bytes, saved references]

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: Tensor) -> _Saved:
        return _Saved(self, tensor)

    def _add(self, key: int, size: int) -> None:
        if key in self.resident:
            return
        entry = self._counts.setdefault(key, [size, 0])
        if entry[1] == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        entry[1] += 1

    def _remove(self, key: int) -> None:
        entry = self._counts.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._counts[key]


def _storage(tensor: Tensor) -> tuple[int, int]:
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor without a plain storage
        return id(tensor), tensor.numel() * tensor.element_size()


class _Saved:
    """A saved tensor as autograd holds it while a :class:`SavedTensorMeter` counts."""

    __slots__ = ("key", "meter", "tensor")

    def __init__(self, meter: SavedTensorMeter, tensor: Tensor) -> None:
        self.meter, self.tensor = meter, tensor
        self.key, size = _storage(tensor)
        meter._add(self.key, size)

    def __del__(self) -> None:
        self.meter._remove(self.key)


def _unpack(saved: _Saved) -> Tensor:
    return saved.tensor


def task_footprint(loop_engine: Engine, module: nn.Module, task: TaskBatch, inner: InnerLoop,
                   outer: OuterObjective, order: MetaGrad) -> int:
    """Bytes autograd saves for the meta-objective of task 0 of ``task``, run by
    ``loop_engine`` (forward and inner steps only; the graph is dropped unused)."""
    first = TaskBatch(*(None if part is None else index(part, slice(0, 1)) for part in task))
    indices = inner.batch_indices
    one = dataclasses.replace(inner, batch_indices=None if indices is None else indices[:1])
    resident = [*module.parameters(), *module.buffers(),
                *(leaf for leaf in leaves(tuple(task)) if isinstance(leaf, Tensor))]
    with torch.enable_grad(), SavedTensorMeter(resident) as meter:
        losses = loop_engine.meta_loss(module, first, one, outer, order=order)
        del losses
    return meter.peak


def predicted_peak(engine: Engine, tasks: int, footprint: int, parameter_bytes: int) -> int:
    """Bytes above the memory in use that ``engine`` needs for a meta-step of ``tasks``."""
    chunk = getattr(engine, "chunk_size", None)
    if engine.name == "vmap":
        at_once = tasks if chunk is None else min(chunk, tasks)
        return int(VMAP_FACTOR * at_once * footprint) + 2 * parameter_bytes
    return int(LOOP_FACTOR * footprint) + 2 * parameter_bytes


def largest_fitting_chunk(tasks: int, footprint: int, parameter_bytes: int,
                          budget: int | None) -> int:
    """The most tasks ``vmap`` may take at once within ``budget`` (``tasks`` if all; 0 if
    not one)."""
    if budget is None:
        return tasks
    room = budget - 2 * parameter_bytes
    if room <= 0:
        return 0
    return min(tasks, int(room // max(VMAP_FACTOR * footprint, 1.0)))


class ProcessPeak:
    """The process's memory high-water mark around a call, as far as it can be seen.

    On CUDA ``torch.cuda.max_memory_allocated``, on Linux the resident-set high-water mark
    (``VmHWM``); neither is reset (a user's own measurement stays whole), so a call's peak
    is seen only where it raised the mark: :attr:`rise` is then the bytes above the memory
    in use at its start, and ``None`` otherwise.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rise: int | None = None

    def _now(self) -> tuple[int | None, int | None]:
        if self.device.type == "cuda":
            return (torch.cuda.memory_allocated(self.device),
                    torch.cuda.max_memory_allocated(self.device))
        return _status_bytes("VmRSS"), _status_bytes("VmHWM")

    def __enter__(self) -> ProcessPeak:
        self._start, self._mark = self._now()
        return self

    def __exit__(self, *exc: Any) -> None:
        _, mark = self._now()
        if None not in (self._start, self._mark, mark) and mark > self._mark:  # type: ignore[operator]
            self.rise = mark - self._start  # type: ignore[operator]


def release_memory(device: torch.device) -> None:
    """Return what an interrupted computation left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GradSnapshot:
    """The ``.grad`` of some tensors, to undo what a failed backward pass wrote."""

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.tensors = tuple(tensors)
        # Only the gradients there are (a meta-step usually starts with none: no clone).
        self.saved = [(t, t.grad.clone()) for t in self.tensors if t.grad is not None]

    def restore(self) -> None:
        for tensor in self.tensors:
            tensor.grad = None
        for tensor, grad in self.saved:
            tensor.grad = grad


@dataclasses.dataclass
class MemoryRecord:
    """What auto knows about memory for one batch shape (bytes)."""

    budget: int | None
    footprint: int
    predicted: dict[str, int]
    parameter_bytes: int = 0
    measured: dict[str, int] = dataclasses.field(default_factory=dict)
    out_of_memory: list[str] = dataclasses.field(default_factory=list)


def by_predicted_peak(candidates: Sequence[tuple[str, Engine]], record: MemoryRecord
                      ) -> list[tuple[str, Engine]]:
    """``candidates`` from the largest predicted peak to the smallest."""
    return sorted(candidates, key=lambda c: -record.predicted.get(c[0], 0))


def run_within_memory(
    record: MemoryRecord,
    candidates: Sequence[tuple[str, Engine]],
    first: str,
    call: Callable[[Engine], Any],
    *,
    device: torch.device,
    grads: Callable[[], Iterable[Tensor]],
    measure: bool = True,
) -> tuple[str, Any]:
    """``call(engine)`` on candidate ``first``; after an out-of-memory error, undo, free,
    record it, and run the same call on the next candidate with a smaller predicted peak.

    Args:
        measure: record the peak the call reaches where it can be seen (two reads of the
            process's status; a trial needs them, a settled meta-step does not).

    Returns ``(label that completed, result)``; the error propagates once no smaller
    candidate is left.
    """
    ordered = by_predicted_peak(candidates, record)
    labels = [label for label, _ in ordered]
    position = labels.index(first)
    snapshot = GradSnapshot(grads())
    while True:
        label, engine = ordered[position]
        failed = False
        peak = ProcessPeak(device)
        try:
            with peak if measure else contextlib.nullcontext():
                result = call(engine)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_out_of_memory(error) or position + 1 >= len(ordered):
                raise
            failed = True  # freed below, once the error and its frames are gone
        if failed:
            snapshot.restore()
            release_memory(device)
            record.out_of_memory.append(label)
            position += 1
            continue
        if peak.rise is not None:
            record.measured[label] = max(record.measured.get(label, 0), peak.rise)
        return label, result


def adapt_footprint(loop_engine: Engine, module: nn.Module, task: TaskBatch, inner: InnerLoop,
                    order: MetaGrad) -> int:
    """Bytes autograd holds at once while ``loop_engine`` adapts task 0 of ``task``."""
    first = TaskBatch(*(None if part is None else index(part, slice(0, 1)) for part in task))
    indices = inner.batch_indices
    one = dataclasses.replace(inner, batch_indices=None if indices is None else indices[:1])
    resident = [*module.parameters(), *module.buffers(),
                *(leaf for leaf in leaves(tuple(task)) if isinstance(leaf, Tensor))]
    with torch.enable_grad(), SavedTensorMeter(resident) as meter:
        del loop_engine.adapt(module, first, one, order=order).params
    return meter.peak


def adapt_in_chunks(engine: Engine, module: nn.Module, task: TaskBatch, inner: InnerLoop,
                    order: MetaGrad, size: int) -> Adaptation:
    """``engine.adapt`` on at most ``size`` tasks at a time, joined as one adaptation."""
    parts = []
    for start in range(0, task.num_tasks, size):
        window = slice(start, start + size)
        part = TaskBatch(*(None if t is None else index(t, window) for t in task))
        indices = inner.batch_indices
        part_loop = dataclasses.replace(
            inner, batch_indices=None if indices is None else indices[window])
        parts.append(engine.adapt(module, part, part_loop, order=order))
    return Adaptation(
        {n: torch.cat([p.params[n] for p in parts]) for n in parts[0].params},
        {n: torch.cat([p.buffers[n] for p in parts]) for n in parts[0].buffers},
        torch.cat([p.support_losses for p in parts]))

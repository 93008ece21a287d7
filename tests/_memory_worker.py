"""Meta-steps of Conv-4 at the Omniglot shape under a memory limit, in a process of their own.

Usage:
    python -m tests._memory_worker rlimit ENGINE HEADROOM_MIB TASKS STEPS [ROUNDS]
    python -m tests._memory_worker budget BUDGET TASKS STEPS

``rlimit``: the address space is limited to the process's size after setup plus
HEADROOM_MIB (``resource.setrlimit(RLIMIT_AS)``), then ENGINE (``auto`` or another name)
runs STEPS meta-steps; then ROUNDS (default 0) rounds each time one more meta-step of it and
one of ``engine="loop"`` on a copy of the model, in turn (``loop_speed``: the median over
rounds of the loop's time over its time). ``budget``: ``memory_budget=BUDGET`` and no
limit; the resident-set high-water mark over the STEPS meta-steps is measured (run it with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set). Prints one
JSON line: steps done, the error if any, the engine, its decision, seconds per step.
"""

from __future__ import annotations

import copy
import json
import resource
import statistics
import sys
import time

import torch

import fastmeta


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def omniglot_batch(tasks: int) -> fastmeta.TaskBatch:
    """5-way 1-shot, 5 query per class, 1×28×28 images."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5)
    return fastmeta.TaskBatch(torch.randn(tasks, 5, 1, 28, 28, generator=g),
                              labels.repeat(tasks, 1),
                              torch.randn(tasks, 25, 1, 28, 28, generator=g),
                              labels.repeat_interleave(5).repeat(tasks, 1))


def run(engine: str, budget: str, tasks: int, steps: int, headroom_mib: float | None,
        rounds: int = 0) -> dict[str, object]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = fastmeta.models.Conv4(in_channels=1, num_classes=5, hidden=64, image_size=28)
    learner = fastmeta.MAML(model, inner_lr=0.4, loss_fn="cross_entropy", engine=engine,
                            memory_budget=budget)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    batch = omniglot_batch(tasks)
    if headroom_mib is not None:
        limit = _status_bytes("VmSize") + int(headroom_mib * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # the high-water mark from here on
    start_rss = _status_bytes("VmRSS")
    done, error, seconds, engines, marks = 0, None, [], [], []
    try:
        for _ in range(steps):
            begin = time.perf_counter()
            learner.meta_step(batch, optimizer)
            seconds.append(time.perf_counter() - begin)
            engines.append(learner.engine)
            marks.append(_status_bytes("VmHWM") - start_rss)
            done += 1
    except RuntimeError as failure:
        error = str(failure).splitlines()[0][:200]
    ratios = []
    if rounds and error is None:
        loop = fastmeta.MAML(copy.deepcopy(model), inner_lr=0.4, loss_fn="cross_entropy",
                             engine="loop")
        loop_optimizer = torch.optim.SGD(loop.parameters(), lr=0.0)
        for _ in range(rounds):
            times = []
            for which, opt in ((learner, optimizer), (loop, loop_optimizer)):
                begin = time.perf_counter()
                which.meta_step(batch, opt)
                times.append(time.perf_counter() - begin)
            ratios.append(times[1] / times[0])
    decision = learner.engine_decision
    return {
        "loop_speed": statistics.median(ratios) if ratios else None, "ratios": ratios,
        "done": done, "error": error, "engine": learner.engine, "engines": engines,
        "seconds": seconds, "peak": _status_bytes("VmHWM") - start_rss, "marks": marks,
        "budget": decision.memory_budget, "footprint": decision.task_footprint,
        "predicted": decision.predicted_peaks, "measured": decision.measured_peaks,
        "timings": decision.timings, "out_of_memory": list(decision.out_of_memory),
        "reason": decision.reason,
    }


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "rlimit":
        result = run(args[0], "auto", int(args[2]), int(args[3]), float(args[1]),
                     int(args[4]) if len(args) > 4 else 0)
    else:
        result = run("auto", args[0], int(args[1]), int(args[2]), None)
    print(json.dumps(result))

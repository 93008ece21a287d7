"""Predicted against measured peak memory of a meta-step, per engine, at the scales users run.

Usage:
    python benchmarks/memory_footprint.py                       # every configuration
    python benchmarks/memory_footprint.py --only omniglot transformer

For each configuration of ``benchmarks/scale.py`` (Conv-4 at the Omniglot and miniImageNet
shapes, ResNet-12, a small Transformer; second-order MAML, float32, one thread): the
footprint ``engine="auto"`` measures (the bytes autograd saves for one task), the peak it
predicts for the per-task loop, ``vmap`` and ``vmap`` in chunks of 4, and the peak measured
for each: the resident-set high-water mark of one meta-step (after a warm-up step) above the
resident set before it, in a fresh process run with ``MALLOC_MMAP_THRESHOLD_=65536`` (freed
tensors leave the resident set). A row whose prediction is over half the machine's available
memory is not run (``skipped``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scale import CONFIGS  # noqa: E402

import fastmeta  # noqa: E402
from fastmeta.engines import LoopEngine, MetaGrad, VmapEngine  # noqa: E402
from fastmeta.engines._memory import (  # noqa: E402
    available_memory,
    predicted_peak,
    task_footprint,
)

NAMES = ("omniglot", "miniimagenet", "resnet12", "transformer")
ENGINES = ("loop", "vmap, chunks of 4", "vmap")


def _engine(label: str) -> fastmeta.engines.Engine:
    if label == "loop":
        return LoopEngine()
    return VmapEngine(chunk_size=4 if "chunks" in label else None)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _learner(name: str, label: str) -> tuple[fastmeta.MAML, fastmeta.TaskBatch]:
    torch.manual_seed(0)
    config = CONFIGS[name]
    learner = fastmeta.MAML(config.model(), inner_lr=config.inner_lr, inner_steps=config.steps,
                            loss_fn=config.loss, engine=_engine(label))
    return learner, learner.prepare(config.batch(config.tasks))


def predict(name: str) -> dict[str, float]:
    """The footprint and each engine's predicted peak, in bytes."""
    learner, task = _learner(name, "loop")
    loop = learner.inner_loop(task, learner.inner_steps)
    footprint = task_footprint(LoopEngine(), learner.module, task, loop,
                               learner.outer_objective(), MetaGrad.SECOND_ORDER)
    weights = sum(p.numel() * p.element_size() for p in learner.parameters())
    return {"footprint": footprint, **{
        label: predicted_peak(_engine(label), task.num_tasks, footprint, weights)
        for label in ENGINES}}


def measure(name: str, label: str) -> float:
    """Bytes above the resident set at the peak of one meta-step (after a warm-up)."""
    learner, task = _learner(name, label)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    learner.meta_step(task, optimizer)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _status("VmRSS")
    learner.meta_step(task, optimizer)
    return _status("VmHWM") - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    room = available_memory(torch.device("cpu")) or 0
    mib = 2**20
    print("| configuration | tasks | footprint (1 task) | engine | predicted | measured |")
    print("|---|---|---|---|---|---|")
    for name in args.only:
        predicted = predict(name)
        for label in ENGINES:
            if predicted[label] > room / 2:
                measured = "skipped"
            else:
                done = subprocess.run([sys.executable, __file__, "--child", name, label],
                                      capture_output=True, text=True, check=True, env=env)
                measured = f"{json.loads(done.stdout.splitlines()[-1]) / mib:.0f} MiB"
            print(f"| {name} | {CONFIGS[name].tasks} | {predicted['footprint'] / mib:.1f} MiB "
                  f"| {label} | {predicted[label] / mib:.0f} MiB | {measured} |", flush=True)


if __name__ == "__main__":
    main()

"""Peak memory of one meta-step against the number of inner steps: iMAML, unrolled MAML,
and unrolled MAML with checkpointed inner steps.

Usage:
    python benchmarks/imaml_memory.py            # 10 and 100 inner steps
    python benchmarks/imaml_memory.py --steps 10 50 100 200

Each cell is a fresh process (float32, 1 thread, Conv-4 with 64 channels at the Omniglot
shape, 5-way 1-shot, 5 query images per class, meta-batch 4, the per-task engine): one
small warm-up meta-step, then the high-water mark of the resident set (``VmHWM``, reset
through ``/proc/self/clear_refs``) during one meta-step, minus the resident set before it.
Each child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then serves every block
above 64 KiB from its own mapping and returns it when freed, so the high-water mark
follows the tensors alive at once. (By default glibc raises that threshold as blocks
are freed and keeps freed memory in its heap, and the mark then also counts
fragmentation: at meta-batch 4 it read 19 MiB at 5 and 77 MiB at 50 checkpointed steps,
where the fixed threshold reads 23 and 43 MiB.)
iMAML keeps no graph through the inner loop, so its peak should not grow with the steps;
second-order MAML keeps every step's graph; with ``LoopEngine(checkpoint_steps=True)`` it keeps
one copy of the weights per step and recomputes the rest.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch

import fastmeta

# Freed tensors go back to the OS at once, so the high-water mark counts live memory.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def _batch(tasks: int) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(tasks, 1)
    return fastmeta.TaskBatch(torch.randn(tasks, 5, 1, 28, 28, generator=g), labels,
                              torch.randn(tasks, 25, 1, 28, 28, generator=g),
                              labels.repeat_interleave(5, dim=1))


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {name} field")


def child(algorithm: str, steps: int) -> dict[str, float]:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = fastmeta.models.Conv4(in_channels=1, num_classes=5, hidden=64, image_size=28)
    options = dict(inner_lr=0.01, inner_steps=steps, loss_fn="cross_entropy", engine="higher")
    if algorithm == "imaml":
        learner: fastmeta.MetaLearner = fastmeta.IMAML(model, lam=1.0, cg_steps=5, **options)
    elif algorithm == "maml-checkpoint":
        options["engine"] = fastmeta.engines.LoopEngine(checkpoint_steps=True)
        learner = fastmeta.MAML(model, **options)
    else:
        learner = fastmeta.MAML(model, **options)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    learner.meta_step(_batch(1), optimizer)  # lazy initialisation, not counted
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to VmRSS
    before = _status_kib("VmRSS")
    learner.meta_step(_batch(4), optimizer)
    return {"peak_mib": (_status_kib("VmHWM") - before) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--child", nargs=2, metavar=("ALGORITHM", "STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    peaks: dict[str, dict[int, float]] = {"imaml": {}, "maml": {}, "maml-checkpoint": {}}
    for algorithm in peaks:
        for steps in args.steps:
            done = subprocess.run([sys.executable, __file__, "--child", algorithm, str(steps)],
                                  capture_output=True, text=True, check=True, env=CHILD_ENV)
            peaks[algorithm][steps] = json.loads(done.stdout.splitlines()[-1])["peak_mib"]
    first = args.steps[0]
    print("| algorithm | " + " | ".join(f"{s} inner steps" for s in args.steps)
          + f" | largest / {first} steps |")
    print("|---" * (len(args.steps) + 2) + "|")
    for algorithm, row in peaks.items():
        name = {"imaml": "iMAML (cg_steps=5)", "maml": "MAML, second order (higher)",
                "maml-checkpoint": "MAML, second order, checkpointed steps (loop)"}[algorithm]
        cells = " | ".join(f"{row[s]:.0f} MiB" for s in args.steps)
        print(f"| {name} | {cells} | {row[args.steps[-1]] / row[first]:.2f}x |")


if __name__ == "__main__":
    main()

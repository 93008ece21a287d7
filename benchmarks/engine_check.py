"""The one-time cost of engine="auto"'s check, against the meta-step it guards.

Usage:
    python benchmarks/engine_check.py            # sine MLP, Conv-4 (Omniglot shape), Transformer
    python benchmarks/engine_check.py --quick    # smaller Conv-4, fewer repeats

For each configuration, in one process: the seconds the check took (``engine_decision
.check_seconds``: the learner's computation on a float64 copy, two tasks, at most two inner
steps, a query set the size of the support set, with both engines), the seconds the same
comparison takes on the whole of the two tasks with every inner step (what the check cost
before it was made smaller), and the median time of a meta-step of the same learner once
its tuner has chosen, float32, one thread. The check runs once per learner (and once more
before the first ``adapt``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import fastmeta
from fastmeta.engines import HigherEngine, VmapEngine

MAX_TUNING_STEPS = 20  # auto's tuner chooses after 7 meta-steps per batch shape


def sine() -> tuple[nn.Module, fastmeta.TaskBatch, dict[str, object]]:
    task = fastmeta.TaskBatch(torch.randn(25, 10, 1), torch.randn(25, 10, 1),
                         torch.randn(25, 10, 1), torch.randn(25, 10, 1))
    return fastmeta.models.SineMLP(), task, {"inner_lr": 0.01}


def conv4(quick: bool) -> Callable[[], tuple[nn.Module, fastmeta.TaskBatch, dict[str, object]]]:
    def build() -> tuple[nn.Module, fastmeta.TaskBatch, dict[str, object]]:
        tasks, hidden = (8, 32) if quick else (32, 64)
        x = torch.randn(tasks, 5, 1, 28, 28)
        y = torch.arange(5).repeat(tasks, 1)
        q = torch.randn(tasks, 25, 1, 28, 28)
        model = fastmeta.models.Conv4(in_channels=1, num_classes=5, hidden=hidden,
                                      image_size=28)
        return model, fastmeta.TaskBatch(x, y, q, torch.arange(5).repeat_interleave(5).repeat(
            tasks, 1)), {"inner_lr": 0.4, "loss_fn": "cross_entropy"}

    return build


class _Transformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def miniimagenet() -> tuple[nn.Module, fastmeta.TaskBatch, dict[str, object]]:
    labels = torch.arange(5)
    task = fastmeta.TaskBatch(torch.randn(4, 5, 3, 84, 84), labels.repeat(4, 1),
                              torch.randn(4, 75, 3, 84, 84),
                              labels.repeat_interleave(15).repeat(4, 1))
    model = fastmeta.models.Conv4(in_channels=3, num_classes=5, hidden=32, image_size=84)
    return model, task, {"inner_lr": 0.01, "inner_steps": 5, "loss_fn": "cross_entropy"}


def transformer() -> tuple[nn.Module, fastmeta.TaskBatch, dict[str, object]]:
    ids = torch.randint(1, 50, (4, 5, 16))
    labels = torch.arange(5).repeat(4, 1)
    return _Transformer(), fastmeta.TaskBatch(ids, labels, ids, labels), {
        "inner_lr": 0.1, "loss_fn": "cross_entropy"}


def measure(build: Callable[[], tuple[nn.Module, fastmeta.TaskBatch, dict[str, object]]],
            repeats: int) -> tuple[float, float, float, str]:
    torch.manual_seed(0)
    model, task, options = build()
    learner = fastmeta.MAML(model, **options)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    start = time.perf_counter()
    for engine in (HigherEngine(), VmapEngine()):  # the comparison on the whole two tasks
        learner._probe("meta_gradient", task, None, engine, torch.float64, small=False)
    whole = time.perf_counter() - start
    learner.meta_step(task, optimizer)  # the first one checks
    for _ in range(MAX_TUNING_STEPS):  # then the tuner times its candidates
        if not learner.engine_decision.tuning:
            break
        learner.meta_step(task, optimizer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        learner.meta_step(task, optimizer)
        times.append(time.perf_counter() - start)
    return (learner.engine_decision.check_seconds, whole, statistics.median(times),
            learner.engine)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Conv-4 with 8 tasks, 32 channels")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 3 if args.quick else 5
    configs = {"sine MLP, 25 tasks": sine,
               f"Conv-4 Omniglot shape{' (quick)' if args.quick else ''}": conv4(args.quick),
               "Transformer, 4 tasks": transformer}
    if not args.quick:
        configs["Conv-4 miniImageNet shape, 4 tasks, 5 steps"] = miniimagenet
    print("| configuration | engine | check (s) | the same on the whole two tasks (s) | "
          "meta-step (s, median) | check / meta-step |")
    print("|---|---|---|---|---|---|")
    for name, build in configs.items():
        check, whole, step, engine = measure(build, repeats)
        print(f"| {name} | {engine} | {check:.3f} | {whole:.3f} | {step:.3f} | "
              f"{check / step:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

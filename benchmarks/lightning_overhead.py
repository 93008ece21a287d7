"""What a Lightning Trainer adds to each meta-step: ``MetaModule`` against a plain loop.

Usage:
    python benchmarks/lightning_overhead.py             # 300 steps, 5 rounds
    python benchmarks/lightning_overhead.py --quick     # 100 steps, 3 rounds

The sine MAML setting of the MAML paper (MLP 1-40-40-1, meta-batch 25, K = 10 support and
10 query points, one inner SGD step, Adam 1e-3), float32, one thread, the vectorised
engine. In one process, alternating: ``learner.meta_step`` in a plain Python loop, and
``lightning.Trainer(max_steps=...).fit(MetaModule(...))`` on the same pre-built batches
(no logger, checkpoints, progress bar or validation). Printed per round: milliseconds
per meta-step of each, the plain loop's measured around the loop, Lightning's measured
around ``fit`` (its set-up included) and between the first and last batch (without it);
then the medians and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from torch.utils.data import DataLoader

import fastmeta
from fastmeta.data import BatchMetaDataLoader, sinusoid


def learner() -> fastmeta.MAML:
    torch.manual_seed(0)
    return fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01, engine="vmap")


def plain(batches: list[Any]) -> float:
    model = learner()
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    start = time.perf_counter()
    for batch in batches:
        model.meta_step(batch, optimizer)
    return (time.perf_counter() - start) / len(batches)


def with_lightning(batches: list[Any]) -> tuple[float, float]:
    import lightning

    from fastmeta.lightning import MetaModule

    marks: list[float] = []

    class Clock(lightning.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if not marks:
                marks.append(time.perf_counter())

        def on_train_batch_end(self, *args: Any) -> None:
            marks[1:] = [time.perf_counter()]

    module = MetaModule(learner(), optimizer=lambda p: torch.optim.Adam(p, 1e-3))
    trainer = lightning.Trainer(
        accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    whole = (time.perf_counter() - start) / len(batches)
    steady = (marks[1] - marks[0]) / (len(batches) - 1)  # first start to last end
    return whole, steady


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, rounds = (100, 3) if args.quick else (300, 5)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # Lightning's advice on workers and loggers
    import logging
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    tasks = sinusoid(10, test_shots=10, seed=0, num_tasks=25 * steps)
    batches = list(BatchMetaDataLoader(tasks, batch_size=25))
    plain(batches[:20])  # warm-up: allocator, vmap tracing
    with_lightning(batches[:20])
    loops, wholes, steadies = [], [], []
    for r in range(rounds):
        loops.append(plain(batches))
        whole, steady = with_lightning(batches)
        wholes.append(whole)
        steadies.append(steady)
        print(f"round {r + 1}: plain {1e3 * loops[-1]:.2f} ms/step, Lightning "
              f"{1e3 * whole:.2f} ms/step with set-up, {1e3 * steady:.2f} without")
    loop, whole, steady = (statistics.median(v) for v in (loops, wholes, steadies))
    print(f"median over {rounds} rounds of {steps} meta-steps: plain {1e3 * loop:.2f} ms, "
          f"Lightning {1e3 * whole:.2f} ms ({whole / loop:.2f}x) with set-up, "
          f"{1e3 * steady:.2f} ms ({steady / loop:.2f}x) without")


if __name__ == "__main__":
    main()

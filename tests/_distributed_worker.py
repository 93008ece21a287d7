"""One process of the two-process tests in test_distributed.py (not a test module).

Usage (what the tests run, once per rank, with torchrun's environment variables set):
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \\
        python tests/_distributed_worker.py --out DIR [--fail]

Without ``--fail`` it meta-trains every case of ``CASES`` for ``STEPS`` meta-steps on
its share of each meta-batch and saves the meta-parameters and reported losses to
``DIR/<case>-rank<r>.pt``. With ``--fail``, rank 1 gets a NaN support target at
meta-step 2 (every rank must raise DivergenceError, which is caught and printed), then,
in a new run, raises inside its inner loop at meta-step 2 (every process must exit).
``train(case, world_size=1)`` is the single-process reference the tests compare with.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fastmeta
import fastmeta.distributed as fmd
from fastmeta.data import BatchMetaDataLoader, sinusoid

STEPS = 3
META_BATCH = 5  # 3 + 2 tasks on two ranks: an uneven split
FAIL_STEP = 2

# case -> (algorithm, engine, dtype)
CASES: dict[str, tuple[str, str, torch.dtype]] = {
    "maml-vmap": ("maml", "vmap", torch.float64),
    "maml-higher": ("maml", "higher", torch.float64),
    "fomaml-vmap": ("fomaml", "vmap", torch.float64),
    "reptile-vmap": ("reptile", "vmap", torch.float64),
    "reptile-higher": ("reptile", "higher", torch.float64),
    "metasgd-vmap": ("metasgd", "vmap", torch.float64),
    "metasgd-higher": ("metasgd", "higher", torch.float64),
    "anil-vmap": ("anil", "vmap", torch.float64),
    "maml-vmap-float32": ("maml", "vmap", torch.float32),
    "maml-auto": ("maml", "auto", torch.float64),
    # engine="auto" where only rank 1's check finds the engines disagree: both take higher
    "maml-auto-split": ("maml", "auto", torch.float64),
}


class FailingMLP(nn.Module):
    """A 1-8-8-1 tanh MLP whose forward raises while ``fail`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.fail = False

    def forward(self, x: Tensor) -> Tensor:
        if self.fail:
            raise RuntimeError(f"injected failure in the inner loop of rank {fmd.rank()}")
        return self.head(self.body(x))


def build(case: str, seed: int) -> tuple[fastmeta.MetaLearner, torch.optim.Optimizer]:
    """The learner and outer optimiser of ``case``, initialised from ``seed``."""
    algorithm, engine, dtype = CASES[case]
    torch.manual_seed(seed)
    model = FailingMLP().to(dtype)
    options: dict[str, Any] = {"inner_lr": 0.05, "engine": engine}
    learner: fastmeta.MetaLearner
    if algorithm == "maml":
        learner = fastmeta.MAML(model, inner_steps=2, **options)
    elif algorithm == "fomaml":
        learner = fastmeta.FOMAML(model, inner_steps=2, **options)
    elif algorithm == "reptile":
        learner = fastmeta.Reptile(model, inner_steps=3, **options)
    elif algorithm == "metasgd":
        learner = fastmeta.MetaSGD(model, inner_steps=2, **options)
    else:
        learner = fastmeta.ANIL(model, head="head", inner_steps=2, **options)
    return learner, torch.optim.Adam(learner.parameters(), lr=0.01)


def train(case: str, fail: str | None = None) -> dict[str, Any]:
    """Meta-train ``case`` for ``STEPS`` steps; data-parallel when a job is initialised.

    Every rank starts from a different random init (seed 100 + rank): ``data_parallel``
    must broadcast rank 0's. A single process uses seed 100.
    """
    learner, optimizer = build(case, seed=100 + fmd.rank())
    if fmd.is_distributed():
        fmd.data_parallel(learner)
    if case == "maml-auto-split" and fmd.rank() == 1:  # any difference counts as one here
        import fastmeta.engines._auto as auto

        auto._tolerance = lambda dtype: -1.0
    loader = BatchMetaDataLoader(sinusoid(4, test_shots=6, seed=7), batch_size=META_BATCH)
    losses, task_losses = [], []
    for step, batch in zip(range(1, STEPS + 1), loader):
        mine = fmd.shard(batch)
        if step == FAIL_STEP and fmd.rank() == 1 and fail == "raise":
            learner.module.fail = True  # type: ignore[union-attr]
        if step == FAIL_STEP and fmd.rank() == 1 and fail == "diverge":
            mine["train"][1][-1, 0] = float("nan")
        result = learner.meta_step(mine, optimizer)
        losses.append(result.loss)
        task_losses.append(result.task_losses)
    return {
        "state": {k: v.detach().clone() for k, v in learner.state_dict().items()},
        "losses": losses,
        "task_losses": task_losses,
        "engine": learner.engine,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fail", action="store_true", help="the failure scenarios")
    args = parser.parse_args()
    torch.set_num_threads(1)
    # A long collective timeout: the tests must see the library's own error, not gloo's.
    assert fmd.init_from_env(timeout=timedelta(seconds=300))
    try:
        if args.fail:
            # Divergence first: every rank raises DivergenceError and may go on, as here.
            try:
                train("maml-vmap", fail="diverge")
            except fastmeta.DivergenceError as error:
                print(f"DivergenceError: {error}", flush=True)
            train("maml-vmap", fail="raise")  # ends every process with an error
        else:
            for case in CASES:
                torch.save(train(case), args.out / f"{case}-rank{fmd.rank()}.pt")
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

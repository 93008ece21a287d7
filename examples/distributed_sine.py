"""Meta-train MAML on sine waves with one process or several (data parallel, torchrun).

The same script runs both ways, with the same meaning: with the same seed, N processes
train on the same meta-batches as one process (each on its share), and end with the same
meta-parameters (up to float rounding). Only rank 0 prints and writes the checkpoint;
``--resume`` continues from it on any number of processes.

Usage:
    python examples/distributed_sine.py --iterations 200
    torchrun --standalone --nproc_per_node=2 examples/distributed_sine.py --iterations 200
    torchrun --standalone --nproc_per_node=2 examples/distributed_sine.py --iterations 400 \\
        --resume                                     # continues from sine_maml.pt

Several machines: run on each
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=sine --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST0:29400 examples/distributed_sine.py
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import torch

import fastmeta
import fastmeta.distributed as fmd
from fastmeta.bench import load_checkpoint, save_checkpoint
from fastmeta.data import BatchMetaDataLoader, sinusoid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200, help="meta-iterations in all")
    parser.add_argument("--meta-batch-size", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", type=Path, default=Path("sine_maml.pt"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()

    fmd.init_from_env()  # joins the torchrun job; does nothing under plain python
    device = fmd.device()  # cuda:LOCAL_RANK under NCCL, else the CPU
    torch.manual_seed(args.seed)  # the same initial model everywhere (also broadcast)
    learner = fastmeta.MAML(fastmeta.models.SineMLP().to(device), inner_lr=0.01)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    start = 0
    if args.resume:  # every rank loads the checkpoint: weights and optimiser state
        # tensors and plain data only, never code; each tensor checked against its digest
        state = load_checkpoint(args.checkpoint)
        learner.load_state_dict(state["learner"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
    if fmd.is_distributed():
        fmd.data_parallel(learner)

    # The same seeded stream of full meta-batches on every rank; each keeps its share.
    tasks = sinusoid(10, test_shots=10, preset="maml", seed=args.seed)
    loader = BatchMetaDataLoader(tasks, batch_size=args.meta_batch_size)
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)),
                               start, args.iterations)  # fmt: skip
    result = None
    for iteration, batch in enumerate(batches, start=start + 1):
        result = learner.meta_step(fmd.shard(batch), optimizer)  # loss: all tasks' mean
        if fmd.is_main_process() and iteration % 100 == 0:
            print(f"iteration {iteration}: meta-loss {result.loss:.6f}", flush=True)
    if fmd.is_main_process():
        state = {"learner": learner.state_dict(), "optimizer": optimizer.state_dict(),
                 "iteration": args.iterations}  # fmt: skip
        save_checkpoint(args.checkpoint, state)  # atomic, with a SHA-256 digest per tensor
        checksum = sum(float(p.detach().double().sum()) for p in learner.parameters())
        print(f"{fmd.world_size()} process(es): final meta-loss "
              f"{result.loss if result else float('nan'):.6f}, parameter checksum "
              f"{checksum:.9f}; saved {args.checkpoint}")  # fmt: skip
    if fmd.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

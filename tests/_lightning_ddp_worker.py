"""Two-process Lightning DDP run of ``MetaModule`` (not a test module; test_lightning.py runs it).

Usage:
    python tests/_lightning_ddp_worker.py --out DIR --engine vmap|higher

Lightning starts the second process itself (it runs this script again with
``LOCAL_RANK=1``). Both processes meta-train a MAML learner with ``strategy="ddp"`` on
CPU (gloo) for ``STEPS`` steps, every process reading the same meta-batches from a seeded
``BatchMetaDataLoader`` and keeping its share (``shard_batches=True``,
``use_distributed_sampler=False``). Then, in the same process group, an identical
learner is meta-trained with fastmeta's own data-parallel loop
(:func:`fastmeta.distributed.data_parallel` and :func:`fastmeta.distributed.shard`).
Rank 0 saves both sets of meta-parameters and the logged losses to ``DIR/ddp.pt``.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import lightning
import torch
import torch.distributed as dist

import fastmeta
import fastmeta.distributed as fmd
from fastmeta.data import BatchMetaDataLoader, sinusoid
from fastmeta.lightning import MetaModule

STEPS = 6
META_BATCH = 5  # 3 + 2 tasks on two processes: an uneven split


def loader() -> BatchMetaDataLoader:
    tasks = sinusoid(5, test_shots=5, seed=3, num_tasks=STEPS * META_BATCH, dtype=torch.float64)
    return BatchMetaDataLoader(tasks, batch_size=META_BATCH)


def learner(engine: str) -> fastmeta.MAML:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return fastmeta.MAML(model.double(), inner_lr=0.05, engine=engine)


def adam(params):  # type: ignore[no-untyped-def]
    return torch.optim.Adam(params, 1e-2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--engine", default="vmap")
    args = parser.parse_args()
    out = args.out
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # Lightning's tips about workers and loggers
    data = list(loader())  # the same seeded meta-batches in every process
    initial = learner(args.engine)
    module = MetaModule(copy.deepcopy(initial), optimizer=adam, shard_batches=True)
    losses: list[float] = []

    class Record(lightning.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            losses.append(float(trainer.callback_metrics["train/meta_loss"]))

    trainer = lightning.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[Record()],
    )
    trainer.fit(module, loader())

    # fastmeta's own data-parallel run, in the same process group
    reference = fmd.data_parallel(copy.deepcopy(initial))
    optimizer = adam(reference.parameters())
    reference_losses = [reference.meta_step(fmd.shard(b), optimizer).loss for b in data]
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({
            "lightning": {k: v.detach() for k, v in module.learner.state_dict().items()},
            "fastmeta": {k: v.detach() for k, v in reference.state_dict().items()},
            "initial": initial.state_dict(),
            "lightning_losses": losses,
            "fastmeta_losses": reference_losses,
            "world_size": dist.get_world_size(),
            "global_step": trainer.global_step,
        }, out / "ddp.pt")


if __name__ == "__main__":
    main()

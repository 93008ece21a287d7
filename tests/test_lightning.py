"""fastmeta.lightning.MetaModule inside a real Lightning Trainer.

Every comparison is against fastmeta's own loop on the same batches: ``learner.meta_step``
with a ``torch.optim`` optimiser (clipping by ``torch.nn.utils`` in a step pre-hook,
bf16 by ``torch.autocast``), so Lightning adds nothing and loses nothing.
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fastmeta
from fastmeta.data import BatchMetaDataLoader, sinusoid
from tests.conftest import tiny_mlp

lightning = pytest.importorskip("lightning")
from fastmeta.lightning import MetaModule  # noqa: E402

pytestmark = [
    # Lightning's advice for training runs (no val_dataloader, a small log interval)
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]


def sine_batches(n: int, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> list[Any]:
    tasks = sinusoid(5, test_shots=5, seed=seed, num_tasks=4 * n, dtype=dtype)
    return list(BatchMetaDataLoader(tasks, batch_size=4))


def loader(batches: list[Any]) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # one meta-batch per item, in order


def trainer(**kwargs: Any) -> Any:
    settings: dict[str, Any] = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    return lightning.Trainer(**{**settings, **kwargs})


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, 1e-2)


def maml(dtype: torch.dtype = torch.float64) -> fastmeta.MAML:
    return fastmeta.MAML(tiny_mlp(dtype), inner_lr=0.05, engine="vmap")


def reference_run(
    learner: fastmeta.MetaLearner, batches: list[Any], steps: int, make: Any = adam
) -> fastmeta.MetaLearner:
    optimizer = make(learner.parameters())
    for i in range(steps):
        learner.meta_step(batches[i % len(batches)], optimizer)
    return learner


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), (name, float((x - y).abs().max()))


def test_twenty_trainer_steps_equal_twenty_meta_steps() -> None:
    batches = sine_batches(8)  # the loader runs out and restarts: 2.5 epochs
    learner = maml()
    reference = reference_run(copy.deepcopy(learner), batches, 20)
    run = trainer(max_steps=20)
    module = MetaModule(learner, optimizer=adam)
    run.fit(module, loader(batches))
    assert run.global_step == 20 and learner.meta_steps_taken == 20
    assert_same_weights(learner, reference)
    assert not torch.equal(next(learner.parameters()), next(maml().parameters()))


def test_three_hundred_steps_log_a_falling_meta_loss_through_csv_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    learner = fastmeta.MAML(tiny_mlp(torch.float32), inner_lr=0.05, engine="vmap")
    run = trainer(max_steps=300, logger=CSVLogger(tmp_path, name="sine"), log_every_n_steps=1)
    tasks = sinusoid(5, test_shots=5, seed=1, num_tasks=300 * 4)
    run.fit(MetaModule(learner, optimizer=adam), BatchMetaDataLoader(tasks, batch_size=4))
    with open(Path(run.logger.log_dir) / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/meta_loss")]
    losses = [float(row["train/meta_loss"]) for row in rows]
    assert len(losses) == 300
    assert [int(row["step"]) for row in rows] == list(range(300))
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.8 * first, (first, last)


class Recording(MetaModule):
    """A MetaModule that keeps every training batch it is given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Any] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(copy.deepcopy(batch))
        return super().training_step(batch, batch_idx)


def test_checkpoint_and_resume_through_the_trainer_is_exact(tmp_path: Path) -> None:
    # MAML++'s multi-step loss weights follow the meta-step count: a resumed run must know it
    def learner() -> fastmeta.MAMLPlusPlus:
        return fastmeta.MAMLPlusPlus(tiny_mlp(), inner_lr=0.05, inner_steps=2,
                                     multi_step_iterations=15, per_step_batch_norm=False,
                                     engine="vmap")

    def cosine(optimizer: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)

    batches = sine_batches(5)
    first = MetaModule(learner(), optimizer=adam, scheduler=cosine)
    first_run = trainer(max_steps=10)
    first_run.fit(first, loader(batches))
    path = tmp_path / "step10.ckpt"
    first_run.save_checkpoint(path)
    # fastmeta's own loop from the same state: weights, Adam's moments, the step count and
    # the learning-rate schedule
    reference = copy.deepcopy(first.learner)
    optimizer = adam(reference.parameters())
    optimizer.load_state_dict(first_run.optimizers[0].state_dict())
    schedule = cosine(optimizer)
    schedule.load_state_dict(first_run.lr_scheduler_configs[0].scheduler.state_dict())

    resumed = Recording(learner(), optimizer=adam, scheduler=cosine)
    resumed_run = trainer(max_steps=20)
    resumed_run.fit(resumed, loader(batches), ckpt_path=path)
    assert resumed_run.global_step == 20 and resumed.learner.meta_steps_taken == 20
    # (Lightning chooses which batches a resumed epoch sees; the learner must continue exactly)
    assert len(resumed.seen) == 10
    for batch in resumed.seen:
        reference.meta_step(batch, optimizer)
        schedule.step()
    assert reference.meta_steps_taken == 20
    assert_same_weights(resumed.learner, reference)
    optimizer_state = resumed_run.optimizers[0].state_dict()["state"]
    assert all(int(s["step"]) == 20 for s in optimizer_state.values())
    assert resumed_run.optimizers[0].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] < 1e-4  # annealed to near 0 at step 20 of 20


@pytest.mark.parametrize("kind", ["cosine", "plateau"])
def test_a_learning_rate_schedule_steps_once_per_meta_step(kind: str) -> None:
    def schedule(optimizer: torch.optim.Optimizer) -> Any:
        if kind == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=8)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0, factor=0.5)

    batches = sine_batches(4)
    learner = maml()
    reference = copy.deepcopy(learner)
    optimizer = adam(reference.parameters())
    reference_schedule = schedule(optimizer)
    for i in range(6):
        loss = reference.meta_step(batches[i % 4], optimizer).loss
        if kind == "cosine":
            reference_schedule.step()
        else:
            reference_schedule.step(loss)
    run = trainer(max_steps=6)
    run.fit(MetaModule(learner, optimizer=adam, scheduler=schedule), loader(batches))
    assert_same_weights(learner, reference)
    assert run.optimizers[0].param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] < 1e-2


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_clips_the_meta_gradient(algorithm: str) -> None:
    batches = sine_batches(5)
    limit = 1e-2
    learner = maml()
    params = list(learner.parameters())

    def clipped_sgd(params: Any) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(params, 0.1)

        def clip(*_: Any) -> None:
            if algorithm == "norm":
                torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], limit)
            else:
                torch.nn.utils.clip_grad_value_(optimizer.param_groups[0]["params"], limit)

        optimizer.register_step_pre_hook(clip)
        return optimizer

    reference = reference_run(copy.deepcopy(learner), batches, 5, clipped_sgd)
    unclipped = reference_run(copy.deepcopy(learner), batches, 5,
                              lambda p: torch.optim.SGD(p, 0.1))
    module = MetaModule(learner, optimizer=lambda p: torch.optim.SGD(p, 0.1),
                        gradient_clip_val=limit, gradient_clip_algorithm=algorithm)
    trainer(max_steps=5).fit(module, loader(batches))
    assert_same_weights(learner, reference)
    assert not torch.equal(params[0], next(unclipped.parameters()))  # clipping did bite


def test_bf16_mixed_precision_runs_the_meta_step_under_autocast() -> None:
    batches = sine_batches(5, dtype=torch.float32)
    learner = maml(torch.float32)
    reference = copy.deepcopy(learner)
    optimizer = adam(reference.parameters())
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference.meta_step(batch, optimizer)
    full = reference_run(copy.deepcopy(learner), batches, 5)
    run = trainer(max_steps=5, precision="bf16-mixed")
    run.fit(MetaModule(learner, optimizer=adam), loader(batches))
    assert_same_weights(learner, reference)
    assert not torch.equal(next(learner.parameters()), next(full.parameters()))
    assert all(p.dtype == torch.float32 for p in learner.parameters())


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def class_tasks(tasks: int, seed: int) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(4).expand(tasks, 12)
    centres = torch.randn(tasks, 3, 4, generator=g) * 2
    x = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, 4)) + torch.randn(
        tasks, 12, 4, generator=g)
    return {"train": [x[:, :6], labels[:, :6]], "test": [x[:, 6:], labels[:, 6:]]}


def test_validation_adapts_and_logs_query_loss_and_accuracy() -> None:
    learner = fastmeta.MAML(Classifier(), inner_lr=0.5, loss_fn="cross_entropy",
                            engine="vmap")
    module = MetaModule(learner, optimizer=adam, eval_steps=3)
    val = [class_tasks(5, seed=10), class_tasks(3, seed=11)]
    run = trainer(max_steps=2, limit_val_batches=2, val_check_interval=2)
    run.fit(module, loader([class_tasks(4, seed=s) for s in range(2)]), loader(val))
    before = {k: v.clone() for k, v in learner.state_dict().items()}

    losses, hits = [], []
    for batch in val:  # by hand: adapt 3 steps, score the query set, average over all tasks
        adapted = learner.adapt_many(batch, steps=3)
        logits = adapted(batch["test"][0]).detach()
        for t in range(logits.shape[0]):
            target = batch["test"][1][t]
            losses.append(float(nn.functional.cross_entropy(logits[t], target)))
            hits.append(float((logits[t].argmax(-1) == target).double().mean()))
    metrics = run.callback_metrics
    assert float(metrics["val/query_loss"]) == pytest.approx(sum(losses) / 8, rel=1e-6)
    assert float(metrics["val/query_accuracy"]) == pytest.approx(sum(hits) / 8, rel=1e-6)
    assert "train/meta_loss" in metrics
    assert_same_weights(learner, _module_from(before, learner))  # validation changed nothing


def _module_from(state: dict[str, torch.Tensor], like: nn.Module) -> nn.Module:
    other = copy.deepcopy(like)
    other.load_state_dict(state)
    return other


def test_regression_validation_logs_no_accuracy() -> None:
    batches = sine_batches(2)
    module = MetaModule(maml(), optimizer=adam)
    run = trainer(max_steps=1, limit_val_batches=1, val_check_interval=1)
    run.fit(module, loader(batches), loader(batches))
    assert "val/query_loss" in run.callback_metrics
    assert "val/query_accuracy" not in run.callback_metrics


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"learner": nn.Linear(1, 1)}, TypeError, "learner must be a fastmeta learner.*Linear"),
        ({"optimizer": None}, TypeError, "optimizer must be a function.*NoneType.*lambda params"),
        ({"eval_steps": -1}, ValueError, "eval_steps"),
        ({"scheduler": 0.5}, TypeError, "scheduler must be a function .*got float"),
        ({"gradient_clip_val": 0.0}, ValueError, "gradient_clip_val must be .* > 0.*got 0.0"),
        ({"gradient_clip_val": float("nan")}, ValueError, "gradient_clip_val.*got nan"),
        ({"gradient_clip_algorithm": "l2"}, ValueError,
         r"gradient_clip_algorithm must be one of \['norm', 'value'\], got 'l2'"),
    ],
    ids=["learner", "optimizer", "eval_steps", "scheduler", "clip-zero", "clip-nan",
         "clip-algorithm"],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    arguments: dict[str, Any] = {"learner": maml(), "optimizer": adam, **kwargs}
    learner = arguments.pop("learner")
    with pytest.raises(error, match=match):
        MetaModule(learner, **arguments)


def test_an_optimizer_factory_must_build_an_optimizer() -> None:
    module = MetaModule(maml(), optimizer=lambda params: list(params))
    with pytest.raises(TypeError, match=r"optimizer\(params\) must return a torch.optim.Opt"):
        trainer(max_steps=1).fit(module, loader(sine_batches(1)))


def test_a_scheduler_factory_must_build_a_schedule() -> None:
    module = MetaModule(maml(), optimizer=adam, scheduler=lambda optimizer: "cosine")
    with pytest.raises(TypeError, match=r"scheduler\(optimizer\) must return .*, got str"):
        trainer(max_steps=1).fit(module, loader(sine_batches(1)))


def test_two_optimisers_are_refused_with_the_fix() -> None:
    class TwoOptimisers(MetaModule):
        def configure_optimizers(self) -> Any:
            return [adam(self.learner.parameters()), adam(self.learner.parameters())]

    module = TwoOptimisers(maml(), optimizer=adam)
    with pytest.raises(TypeError, match="steps one outer optimiser.*gave 2; build one"):
        trainer(max_steps=1).fit(module, loader(sine_batches(1)))


def test_batch_meta_data_loader_refuses_a_lightning_distributed_sampler_with_the_fix() -> None:
    # what Lightning does to add its distributed sampler: re-create the loader with the
    # collate function and a sampler
    loader = BatchMetaDataLoader(sinusoid(5, seed=0, num_tasks=8), batch_size=4)
    with pytest.raises(TypeError, match=r"use_distributed_sampler=False.*shard_batches=True"):
        BatchMetaDataLoader(loader.dataset, batch_size=4, collate_fn=loader.collate_fn)


def test_import_fastmeta_does_not_import_lightning() -> None:
    code = ("import sys, fastmeta, fastmeta.data, fastmeta.distributed; "
            "print(sorted({'lightning', 'pytorch_lightning'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # two processes that each start Lightning and gloo: 20-30 s here
# vmap takes gradients with autograd.grad, higher with backward(): DDP's reducer sees both
@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_ddp_on_two_cpu_processes_equals_fastmeta_data_parallel(tmp_path: Path,
                                                                engine: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "_lightning_ddp_worker.py"), "--out",
         str(tmp_path), "--engine", engine],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "ddp.pt")
    assert result["world_size"] == 2 and result["global_step"] == 6
    for name, value in result["fastmeta"].items():
        assert torch.equal(result["lightning"][name], value), name
        assert not torch.equal(result["initial"][name], value), name
    assert result["lightning_losses"] == pytest.approx(result["fastmeta_losses"], rel=1e-6)

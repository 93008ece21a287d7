"""What ``fastmeta bench omniglot`` and ``fastmeta bench miniimagenet`` share.

Both follow the MAML paper (Finn, Abbeel, Levine 2017, §5.2) and its reference code
(github.com/cbfinn/maml, ``main.py``): Conv-4, N-way K-shot tasks of held-out classes,
MAML or first-order MAML, Adam 1e-3 outer steps, 600 test tasks, accuracy with a 95%
confidence interval (1.96·std/√600). The data come from ``fastmeta.data.Omniglot`` and
``fastmeta.data.MiniImagenet`` under ``--root`` (``--download 1`` fetches them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .._learner import MetaLearner
from .._task import TaskBatch, as_task
from ..data import BatchMetaCollate, ClassSplitter, FewShotDataset
from ._config import BenchConfig, setting
from ._evaluate import accuracy, curve_table, per_task
from ._protocol import Benchmark, Outcome, RunPlan, adam
from ._stats import format_cell, summarize

VISION_ALGORITHMS = ("maml", "fomaml")
EVAL_SEED_OFFSET = 1_000_003
EVAL_CHUNK = 25  # held-out tasks adapted at once: bounds evaluation memory


@dataclass(frozen=True)
class VisionConfig(BenchConfig):
    """Settings shared by the vision benchmarks; each benchmark sets its paper's defaults."""

    algorithms: tuple[str, ...] = setting(
        VISION_ALGORITHMS, "learners to train and compare", choices=VISION_ALGORITHMS)
    root: str = setting("data", "folder holding the dataset's folder (archives or cache)")
    download: int = setting(0, "1: download missing archives into --root", choices=(0, 1))
    ways: int = setting(5, "classes per task: N of N-way")
    shots: int = setting(1, "support images per class")
    query: int = setting(1, "query images per class, in training and evaluation")
    iterations: int = setting(40_000, "meta-iterations per algorithm")
    meta_batch_size: int = setting(32, "tasks per meta-iteration")
    hidden: int = setting(64, "channels of the Conv-4 backbone")
    inner_lr: float = setting(0.4, "inner SGD learning rate α (training and fine-tuning)")
    inner_steps: int = setting(1, "inner SGD steps in training")
    eval_steps: int = setting(10, "fine-tuning steps evaluated (0 through this)")
    eval_tasks: int = setting(600, "held-out (meta-test) tasks")
    meta_lr: float = setting(1e-3, "Adam learning rate of the outer loop")
    seed: int = setting(0, "seed of weights and tasks")
    engine: str = setting("auto", "learner engine", choices=("auto", "vmap", "higher"))
    checkpoint_every: int = setting(500, "meta-iterations between checkpoints")

    # Where the data lie and whether to fetch them do not change a training.
    not_shared: ClassVar[tuple[str, ...]] = ("root", "download", "eval_steps", "eval_tasks")

    def __post_init__(self) -> None:
        self._validate(
            allowed_algorithms=VISION_ALGORITHMS,
            counts=("ways", "shots", "query", "iterations", "meta_batch_size", "hidden",
                    "inner_steps", "eval_tasks", "checkpoint_every"),
            int_lists=(),
            rates=("inner_lr", "meta_lr"),
        )
        if self.ways < 2:
            raise ValueError(f"ways must be >= 2, got {self.ways}")


@dataclass(frozen=True, eq=False)  # hashed by identity: one per benchmark
class VisionSpec:
    """What differs between the vision benchmarks.

    Attributes:
        name: the benchmark's name.
        title: the dataset in prose.
        in_channels: image channels.
        image_size: image side.
        make: ``make(config, split, seed)`` builds the ``FewShotDataset`` of a meta-split.
        published: ``{(ways, shots): {algorithm: (mean %, ci95 %)}}`` from the MAML paper.
        protocol: the paragraph of ``results.md`` describing the protocol.
    """

    name: str
    title: str
    in_channels: int
    image_size: int
    make: Callable[[Any, str, int], FewShotDataset]
    published: Mapping[tuple[int, int], Mapping[str, tuple[float, float]]]
    protocol: str


def learner_spec(spec: VisionSpec, config: VisionConfig, algorithm: str) -> dict[str, Any]:
    """Model and learner settings of ``algorithm`` (stored in its checkpoint)."""
    learner: dict[str, Any] = {"inner_lr": config.inner_lr, "inner_steps": config.inner_steps,
                               "engine": config.engine, "loss_fn": "cross_entropy"}
    if algorithm == "maml":
        learner["first_order"] = False
    return {
        "benchmark": spec.name,
        "algorithm": algorithm,
        "model": {"class": "Conv4", "kwargs": {
            "in_channels": spec.in_channels, "num_classes": config.ways,
            "hidden": config.hidden, "image_size": spec.image_size}},
        "learner": learner,
    }


@functools.cache
def _dataset(spec: VisionSpec, config: VisionConfig, split: str) -> FewShotDataset:
    seed = config.seed + (EVAL_SEED_OFFSET if split == "test" else 0)
    return spec.make(config, split, seed)


def splitter(config: VisionConfig) -> ClassSplitter:
    """Support and query images of every class of a task."""
    return ClassSplitter(num_train_per_class=config.shots, num_test_per_class=config.query)


def _tasks(dataset: FewShotDataset, ways: int, count: int, key: tuple[int, ...]) -> TaskBatch:
    """``count`` tasks of random classes (in random label order), a pure function of ``key``."""
    rng = np.random.default_rng(key)
    classes = len(dataset.dataset)
    combos = [tuple(int(c) for c in rng.choice(classes, ways, replace=False))
              for _ in range(count)]
    dataset.set_epoch(key[-1])  # fresh support/query images per draw, reproducibly
    return as_task(BatchMetaCollate()([dataset[combo] for combo in combos]))


def training_batches(spec: VisionSpec, config: VisionConfig) -> Callable[[int], TaskBatch]:
    """``batch(i)`` of meta-iteration ``i``: the same for every algorithm."""
    dataset = _dataset(spec, config, "train")
    return lambda i: _tasks(dataset, config.ways, config.meta_batch_size, (config.seed, i))


def plan(spec: VisionSpec, config: VisionConfig) -> list[RunPlan]:
    """One run per algorithm, from the same initial weights on the same tasks."""
    return [
        RunPlan(
            name=algorithm,
            algorithm=algorithm,
            spec=learner_spec(spec, config, algorithm),
            iterations=config.iterations,
            batches=functools.partial(training_batches, spec, config),
            training=config.shared_dict(),
            evaluation=config.as_dict(),
            optimizer=adam(config.meta_lr),
        )
        for algorithm in config.algorithms
    ]


def evaluate(spec: VisionSpec, learner: MetaLearner, algorithm: str,
             config: VisionConfig) -> dict[str, Any]:
    """Accuracy on ``eval_tasks`` held-out tasks after ``0 .. eval_steps`` fine-tuning steps.

    Tasks are drawn and adapted ``EVAL_CHUNK`` at a time; every algorithm sees the same.
    """
    dataset = _dataset(spec, config, "test")
    scores: list[list[torch.Tensor]] = [[] for _ in range(config.eval_steps + 1)]
    for start in range(0, config.eval_tasks, EVAL_CHUNK):
        count = min(EVAL_CHUNK, config.eval_tasks - start)
        batch = _tasks(dataset, config.ways, count, (config.seed + EVAL_SEED_OFFSET, start))
        for steps in range(config.eval_steps + 1):
            scores[steps].append(per_task(learner, batch, steps, accuracy))
    curve = {
        "steps": list(range(config.eval_steps + 1)),
        "summaries": [summarize(torch.cat(found)) for found in scores],
    }
    return {f"{config.ways}-way {config.shots}-shot": curve}


def _percent(summary: dict[str, Any]) -> str:
    if summary["mean"] is None:
        return format_cell(summary)
    scaled = {**summary, "mean": 100 * summary["mean"], "ci95": 100 * summary["ci95"]}
    return format_cell(scaled, digits=2) + "%"


def published_entry(spec: VisionSpec, config: VisionConfig) -> dict[str, Any]:
    """The MAML paper's numbers for this setting, as ``{algorithm: {"mean", "ci95"}}``."""
    found = spec.published.get((config.ways, config.shots), {})
    return {name: {"mean": mean, "ci95": ci95, "source": "Finn et al. 2017, Table 1"}
            for name, (mean, ci95) in found.items()}


def markdown(spec: VisionSpec, config_class: type[VisionConfig],
             results: dict[str, Any]) -> str:
    """``results.md``: measured accuracy beside the published one."""
    config = config_class.from_dict(results["config"])
    setting_name = f"{config.ways}-way {config.shots}-shot"
    published = results.get("published", {})
    lines = [
        f"# fastmeta bench {spec.name}",
        "",
        f"{setting_name} classification of held-out {spec.title} classes. {spec.protocol} "
        f"Here: Conv-4 with {config.hidden} channels, {config.iterations:,} meta-iterations, "
        f"meta-batch {config.meta_batch_size}, {config.query} query images per class, inner "
        f"SGD α = {config.inner_lr} ({config.inner_steps} steps in training), Adam "
        f"{config.meta_lr}, seed {config.seed}. Accuracy on {config.eval_tasks} held-out "
        f"tasks, mean ± 95% confidence interval. fastmeta {results['versions']['fastmeta']}, "
        f"torch {results['versions']['torch']}.",
        "",
        f"| algorithm | 0 steps | {config.inner_steps} steps | {config.eval_steps} steps "
        f"| published (Finn et al. 2017) | training time |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in results["algorithms"].items():
        summaries = entry["evaluation"][setting_name]["summaries"]
        cells = [_percent(summaries[0]),
                 _percent(summaries[min(config.inner_steps, config.eval_steps)]),
                 _percent(summaries[config.eval_steps])]
        target = published.get(name)
        shown = f"{target['mean']:.2f} ± {target['ci95']:.2f}%" if target else "—"
        seconds = entry["training"]["seconds"]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {shown} | {seconds:.0f} s |")
    lines += ["", f"Chance is {100 / config.ways:.1f}%. A run far shorter than the paper's "
              f"{config_class().iterations:,} meta-iterations is not comparable with the "
              "published column."]
    return "\n".join(lines) + "\n"


def entry(config: Any, algorithm: str, outcomes: list[Outcome]) -> dict[str, Any]:
    """An algorithm's ``results.json`` entry."""
    (outcome,) = outcomes
    training = {k: v for k, v in outcome.training.items() if k != "final_meta_loss"}
    return {"spec": outcome.run.spec, "checkpoint": outcome.checkpoint,
            "training": training, "evaluation": outcome.evaluation}


def make_benchmark(spec: VisionSpec, config_class: type[VisionConfig],
                   quick: Mapping[str, Any], help: str, description: str) -> Benchmark:
    """The ``Benchmark`` of one vision dataset."""

    def summary(results: dict[str, Any]) -> dict[str, Any]:
        return {"published": published_entry(spec, config_class.from_dict(results["config"]))}

    def eval_figures(*_: Any) -> list[Path]:
        return []

    return Benchmark(
        name=spec.name,
        help=help,
        description=description,
        config=config_class,
        quick=quick,
        plan=functools.partial(plan, spec),
        evaluate=functools.partial(evaluate, spec),
        markdown=functools.partial(markdown, spec, config_class),
        figures=None,
        figure_names=(),
        entry=entry,
        summary=summary,
        eval_options={"steps": "eval_steps", "tasks": "eval_tasks"},
        eval_text=lambda algorithm, evaluation, config: curve_table(
            algorithm, "query accuracy", evaluation),
        eval_figures=eval_figures,
    )

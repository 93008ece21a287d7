"""``fastmeta bench digits``: offline few-shot classification on held-out digit classes.

scikit-learn's bundled 8x8 digits with 90-degree rotations as extra classes (the MAML
Omniglot augmentation): 24 meta-training classes, 8 held-out meta-test classes, no
download. Each algorithm is meta-trained separately for every shot count (as in the MAML
paper) from the same initial weights on the same tasks, then fine-tuned on the same
held-out tasks. The baseline ``finetune`` trains an ordinary 24-way classifier on the
meta-training classes and, on each held-out task, fine-tunes a new zero-initialised
N-way head on the support images (the "Baseline" of Chen et al., ICLR 2019).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .._learner import MetaLearner
from .._task import TaskBatch, as_task
from ..algorithms import ANIL
from ..data import BatchMetaCollate, ClassSplitter, Digits
from . import _plots
from ._config import BenchConfig, setting
from ._evaluate import accuracy, curve_table, fine_tuning_curve
from ._protocol import Benchmark, Outcome, RunPlan, adam
from ._runner import run_benchmark
from ._seeds import with_seeds
from ._signals import StopFlag
from ._stats import format_cell

DIGITS_ALGORITHMS = ("maml", "fomaml", "reptile", "anil", "metasgd", "mamlpp", "imaml",
                     "finetune")
# iMAML is offered but not run by default: 417 ms per meta-iteration on the development
# machine, 13 times MAML.
DIGITS_DEFAULT = tuple(a for a in DIGITS_ALGORITHMS if a != "imaml")
EVAL_SEED_OFFSET = 1_000_003
REPTILE_INNER_STEPS = 5
IMAML_INNER_STEPS, IMAML_LAM = 5, 2.0  # fastmeta's choice, not a published setting
FINETUNE_BATCH = 64  # images per step of the baseline's ordinary training


@dataclass(frozen=True)
class DigitsConfig(BenchConfig):
    """Settings of ``fastmeta bench digits``; every field is a command-line flag."""

    algorithms: tuple[str, ...] = setting(
        DIGITS_DEFAULT, "learners to train and compare (imaml only when named: it is slow)",
        choices=DIGITS_ALGORITHMS)
    ways: int = setting(5, "classes per task: N of N-way (2 to 8)")
    shots: tuple[int, ...] = setting((1, 5), "support images per class; one training and "
                                     "evaluation per value")
    query: int = setting(5, "query images per class, in training and evaluation")
    iterations: int = setting(1000, "meta-iterations per algorithm and shot count")
    meta_batch_size: int = setting(8, "tasks per meta-iteration")
    hidden: int = setting(16, "channels of the Conv-4 backbone")
    inner_lr: float = setting(0.4, "inner SGD learning rate (training and fine-tuning)")
    inner_steps: int = setting(1, "inner steps in training (Reptile: 5)")
    eval_steps: int = setting(5, "fine-tuning steps evaluated (0 through this)")
    eval_tasks: int = setting(600, "held-out tasks")
    meta_lr: float = setting(1e-3, "Adam learning rate of the outer loop")
    seed: int = setting(0, "seed of weights and tasks (the class split is fixed)")
    seeds: int = setting(1, "independent seeds seed, seed+1, ...: one checkpoint each, "
                         "results per seed and across seeds")
    engine: str = setting("auto", "learner engine", choices=("auto", "vmap", "higher"))
    checkpoint_every: int = setting(250, "meta-iterations between checkpoints")

    # Each run trains on one shot count (checked per run), and --seeds (each seed's runs
    # are checked with their own seed).
    not_shared: ClassVar[tuple[str, ...]] = ("shots", "eval_steps", "eval_tasks", "seeds")

    def __post_init__(self) -> None:
        self._validate(
            allowed_algorithms=DIGITS_ALGORITHMS,
            counts=("query", "iterations", "meta_batch_size", "hidden", "inner_steps",
                    "eval_tasks", "checkpoint_every", "seeds"),
            int_lists=("shots",),
            rates=("inner_lr", "meta_lr"),
        )
        if not 2 <= self.ways <= 8:
            raise ValueError(
                f"ways must be between 2 and 8 (the held-out split has 8 classes), got "
                f"{self.ways}"
            )

    def training_dict(self, shots: int) -> dict[str, Any]:
        """The settings that determine one learner's training (checked on ``--resume``)."""
        return {**self.shared_dict(), "train_shots": shots}


QUICK = {"iterations": 200, "eval_tasks": 100, "checkpoint_every": 100}


def quick_digits_config(**overrides: Any) -> DigitsConfig:
    """A few minutes on 2 CPU cores: fewer iterations and held-out tasks."""
    return DigitsConfig(**{**QUICK, **overrides})


# Keyword arguments of each learner beyond inner_lr, engine and loss_fn; None: the
# configuration's inner_steps.
LEARNER_OPTIONS: dict[str, dict[str, Any]] = {
    "maml": {"inner_steps": None},
    "fomaml": {"inner_steps": None},
    "reptile": {"inner_steps": REPTILE_INNER_STEPS},
    "anil": {"inner_steps": None, "head": "head"},
    "metasgd": {"inner_steps": None},
    # MAML++ with every component on (per-step BatchNorm weights of Conv-4 included).
    "mamlpp": {"inner_steps": None},
    "imaml": {"inner_steps": IMAML_INNER_STEPS, "lam": IMAML_LAM, "cg_steps": 5},
    "finetune": {},
}


def learner_spec(config: DigitsConfig, algorithm: str) -> dict[str, Any]:
    """Model and learner settings of ``algorithm`` (stored in its checkpoint)."""
    classes = len(_split(config, "train").dataset) if algorithm == "finetune" else config.ways
    options = {k: config.inner_steps if v is None else v
               for k, v in LEARNER_OPTIONS[algorithm].items()}
    return {
        "benchmark": "digits",
        "algorithm": algorithm,
        "model": {
            "class": "Conv4",
            "kwargs": {
                "in_channels": 1,
                "num_classes": classes,
                "hidden": config.hidden,
                "image_size": 8,
            },
        },
        "learner": {"inner_lr": config.inner_lr, "engine": config.engine,
                    "loss_fn": "cross_entropy", **options},
    }


def plan(config: DigitsConfig) -> list[RunPlan]:
    """One run per algorithm and shot count; one ordinary classifier serves every shot
    count of the fine-tuning baseline."""
    runs = []
    for algorithm in config.algorithms:
        trained_for = config.shots[:1] if algorithm == "finetune" else config.shots
        for shots in trained_for:
            evaluated = config.shots if algorithm == "finetune" else (shots,)
            runs.append(RunPlan(
                name=algorithm if algorithm == "finetune" else f"{algorithm}-{shots}shot",
                algorithm=algorithm,
                spec=learner_spec(config, algorithm),
                iterations=config.iterations,
                batches=functools.partial(training_batches, config, algorithm, shots),
                training=config.training_dict(shots),
                evaluation={**config.as_dict(), "shots": list(evaluated)},
                optimizer=adam(config.meta_lr),
            ))
    return runs


def entry(config: DigitsConfig, algorithm: str, outcomes: list[Outcome]) -> dict[str, Any]:
    """An algorithm's ``results.json`` entry: its runs' training, evaluation, checkpoints."""
    found: dict[str, Any] = {"training": {}, "evaluation": {}, "checkpoints": {}}
    for outcome in outcomes:
        name = outcome.run.name
        found["training"][name] = {k: v for k, v in outcome.training.items()
                                   if k != "final_meta_loss"}
        found["evaluation"].update(outcome.evaluation)
        found["checkpoints"][name] = outcome.checkpoint
    return found


@cache
def _digits(split: str, ways: int, shots: int, query: int, seed: int) -> Digits:
    return Digits(
        ways,
        meta_split=split,
        seed=seed,
        split_seed=0,
        dataset_transform=ClassSplitter(num_train_per_class=shots, num_test_per_class=query),
    )


def _split(config: DigitsConfig, split: str, shots: int = 1) -> Digits:
    seed = config.seed + (EVAL_SEED_OFFSET if split == "test" else 0)
    return _digits(split, config.ways, shots, config.query, seed)


def _tasks(dataset: Digits, ways: int, count: int, key: tuple[int, ...]) -> TaskBatch:
    """``count`` tasks of random classes (in random label order), a pure function of ``key``."""
    rng = np.random.default_rng(key)
    classes = len(dataset.dataset)
    combos = [tuple(int(c) for c in rng.permutation(classes)[:ways]) for _ in range(count)]
    dataset.set_epoch(key[-1])  # fresh support/query images per draw, reproducibly
    return as_task(BatchMetaCollate()([dataset[combo] for combo in combos]))


def training_batches(
    config: DigitsConfig, algorithm: str, shots: int
) -> Callable[[int], TaskBatch]:
    """``batch(i)`` of meta-iteration ``i``: the same for every algorithm and run."""
    dataset = _split(config, "train", shots)
    if algorithm != "finetune":
        return lambda i: _tasks(dataset, config.ways, config.meta_batch_size, (config.seed, i))
    images, labels = _pooled(dataset)

    def batch(iteration: int) -> TaskBatch:
        rng = np.random.default_rng((config.seed, iteration, 1))
        rows = torch.from_numpy(rng.choice(len(labels), FINETUNE_BATCH, replace=False))
        half = FINETUNE_BATCH // 2
        x, y = images[rows].unsqueeze(0), labels[rows].unsqueeze(0)
        return TaskBatch(x[:, :half], y[:, :half], x[:, half:], y[:, half:])

    return batch


def _pooled(dataset: Digits) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of the meta-training classes with its class index (for ``finetune``)."""
    images, labels = [], []
    for index in range(len(dataset.dataset)):
        members = dataset.dataset[index]
        images += [members[i][0] for i in range(len(members))]
        labels += [index] * len(members)
    return torch.stack(images), torch.tensor(labels)


def evaluation_tasks(config: DigitsConfig, shots: int) -> TaskBatch:
    """The held-out tasks (meta-test classes) with ``shots`` support images per class."""
    dataset = _split(config, "test", shots)
    return _tasks(dataset, config.ways, config.eval_tasks, (config.seed + EVAL_SEED_OFFSET, 0))


def evaluation_learner(learner: MetaLearner, algorithm: str, config: DigitsConfig) -> MetaLearner:
    """The learner that fine-tunes on held-out tasks.

    For ``finetune``, a copy of the trained network with a new zero-initialised
    ``ways``-way head, of which only the head is fine-tuned.
    """
    if algorithm != "finetune":
        return learner
    module = copy.deepcopy(learner.module)
    trained_head = module.head
    assert isinstance(trained_head, nn.Linear)  # Conv4's head
    module.head = nn.Linear(trained_head.in_features, config.ways)
    nn.init.zeros_(module.head.weight)
    nn.init.zeros_(module.head.bias)
    return ANIL(module, head="head", inner_lr=config.inner_lr, loss_fn="cross_entropy",
                engine=config.engine)


def evaluate_learner(
    learner: MetaLearner, algorithm: str, config: DigitsConfig
) -> dict[str, Any]:
    """Accuracy curves for every shot count in ``config.shots`` (``{"1-shot": curve}``)."""
    evaluator = evaluation_learner(learner, algorithm, config)
    return {
        f"{shots}-shot": fine_tuning_curve(
            evaluator, evaluation_tasks(config, shots), config.eval_steps, accuracy
        )
        for shots in config.shots
    }


def markdown(results: dict[str, Any]) -> str:
    """``results.md`` of a digits benchmark."""
    config = DigitsConfig.from_dict(results["config"])
    steps = config.eval_steps
    lines = [
        "# fastmeta bench digits",
        "",
        f"{config.ways}-way classification of held-out digit classes (scikit-learn 8x8 digits "
        f"with rotations: 24 meta-training classes, 8 meta-test classes). Conv-4 with "
        f"{config.hidden} channels; {config.iterations:,} meta-iterations per algorithm and "
        f"shot count, meta-batch {config.meta_batch_size}, {config.query} query images per "
        f"class, inner SGD α = {config.inner_lr} ({config.inner_steps} step in training; "
        f"Reptile {REPTILE_INNER_STEPS}; iMAML {IMAML_INNER_STEPS} with λ = {IMAML_LAM}), Adam "
        f"{config.meta_lr}, seed {config.seed}. "
        f"Accuracy on {config.eval_tasks} held-out tasks after {steps} fine-tuning steps, "
        f"mean ± 95% confidence interval. fastmeta {results['versions']['fastmeta']}, "
        f"torch {results['versions']['torch']}.",
        "",
        "| algorithm | " + " | ".join(f"{s}-shot, 0 steps | {s}-shot, {steps} steps"
                                      for s in config.shots) + " | training time |",
        "|---|" + "---|---|" * len(config.shots) + "---|",
    ]
    for name, entry in results["algorithms"].items():
        cells = []
        for shots in config.shots:
            summaries = entry["evaluation"][f"{shots}-shot"]["summaries"]
            cells += [format_cell(summaries[0]), format_cell(summaries[steps])]
        seconds = sum(t["seconds"] for t in entry["training"].values())
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} s |")
    lines += ["", f"Chance is {1 / config.ways:.3f}."]
    if results.get("figures"):
        lines += ["", *[f"![{Path(f).stem}]({Path(f).name})" for f in results["figures"]]]
    return "\n".join(lines) + "\n"


def run_digits(
    config: DigitsConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    stop: StopFlag | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``fastmeta bench digits``: :func:`fastmeta.bench.run_benchmark` of this benchmark."""
    return run_benchmark(BENCHMARK, config, out, resume=resume, progress=progress, plots=plots,
                         stop=stop, stop_after=stop_after, log=log)


def _figures(learners: dict[str, MetaLearner], results: dict[str, Any], config: DigitsConfig,
             out: Path) -> list[Path]:
    panels = {
        f"{config.ways}-way {shots}-shot": {
            name: entry["evaluation"][f"{shots}-shot"]
            for name, entry in results["algorithms"].items()
        }
        for shots in config.shots
    }
    return [_plots.curves(
        panels,
        out / "accuracy_curves.png",
        ylabel="query accuracy (mean ± 95% CI)",
        title=f"Fine-tuning on {config.eval_tasks} held-out digit tasks",
    )]


def _eval_figures(learner: MetaLearner, algorithm: str, evaluation: dict[str, Any],
                  config: DigitsConfig, directory: Path) -> list[Path]:
    panels = {key: {algorithm: curve} for key, curve in evaluation.items()}
    return [_plots.curves(panels, directory / f"eval_{algorithm}_curves.png",
                          ylabel="query accuracy",
                          title=f"{algorithm}: fine-tuning on held-out classes")]


BENCHMARK = with_seeds(Benchmark(
    name="digits",
    help="few-shot digit classification (offline, scikit-learn's 8x8 digits)",
    description="N-way 1-shot and 5-shot classification on held-out digit classes "
    "(scikit-learn's 8x8 digits with rotations as extra classes; no download).",
    config=DigitsConfig,
    quick=QUICK,
    plan=plan,
    evaluate=evaluate_learner,
    markdown=markdown,
    figures=_figures,
    figure_names=("accuracy_curves.png",),
    entry=entry,
    eval_options={"shots": "shots", "steps": "eval_steps", "tasks": "eval_tasks"},
    eval_text=lambda algorithm, evaluation, config: curve_table(
        algorithm, "query accuracy", evaluation),
    eval_figures=_eval_figures,
), format_cell)

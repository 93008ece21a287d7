"""The benchmark protocol: what a ``fastmeta bench`` benchmark declares, and the registry.

A benchmark is data plus a few functions (:class:`Benchmark`): its configuration
dataclass (whose fields, defaults and help generate the command line), the learners to
train (:class:`RunPlan`, one checkpoint each), how to evaluate one learner, and how to
write tables and figures. One runner (:func:`fastmeta.bench.run_benchmark`) trains,
checkpoints, resumes and evaluates every benchmark, and ``fastmeta eval`` evaluates any
checkpoint through the same registry.

Example:
    >>> from fastmeta.bench import benchmark
    >>> sine = benchmark("sine")
    >>> config = sine.config(iterations=100)
    >>> [run.name for run in sine.plan(config)][:2]
    ['maml', 'fomaml']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._learner import MetaLearner
from ._config import BenchConfig, fields_of

# Modules that define the registered benchmarks, imported on first use.
MODULES = {"sine": "fastmeta.bench.sine", "digits": "fastmeta.bench.digits",
           "daml": "fastmeta.bench.daml", "omniglot": "fastmeta.bench.omniglot",
           "miniimagenet": "fastmeta.bench.miniimagenet"}


def adam(lr: float) -> Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]:
    """The outer optimiser of the benchmarks: Adam with learning rate ``lr``."""
    return lambda parameters: torch.optim.Adam(parameters, lr=lr)


@dataclass(frozen=True)
class RunPlan:
    """One learner a benchmark trains: one checkpoint, ``OUT/checkpoints/<name>.pt``.

    Attributes:
        name: the checkpoint's stem (``"maml"``, ``"maml-5shot"``).
        algorithm: the learner's benchmark name (``"maml"``).
        spec: how to build the learner (see ``fastmeta.bench._registry``).
        iterations: meta-iterations to train (0: an untrained baseline).
        batches: builds ``batch(i)``, the batch of meta-iteration ``i`` (a pure function).
        training: the settings that determine this training; ``--resume`` checks them.
        evaluation: the configuration (as a dict) this learner is evaluated under; saved in
            its checkpoint, so ``fastmeta eval`` reproduces the benchmark's numbers.
        optimizer: builds the outer optimiser from the learner's parameters.
        schedule: builds a learning-rate scheduler of that optimiser, or ``None``.
        seed: the seed of the initial weights; ``None``: the configuration's ``seed``
            (``--seeds N`` gives each seed's runs their own).
    """

    name: str
    algorithm: str
    spec: dict[str, Any]
    iterations: int
    batches: Callable[[], Callable[[int], Any]]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
    schedule: Callable[[torch.optim.Optimizer], Any] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Outcome:
    """A trained (or resumed) run with its evaluation.

    Attributes:
        run: the plan.
        checkpoint: the checkpoint's path relative to the output directory.
        training: the training summary (iterations, seconds, loss curve...).
        evaluation: what ``Benchmark.evaluate`` returned.
    """

    run: RunPlan
    checkpoint: str
    training: dict[str, Any]
    evaluation: dict[str, Any]


def single_entry(config: Any, algorithm: str, outcomes: list[Outcome]) -> dict[str, Any]:
    """``results.json`` entry of an algorithm trained once: spec, checkpoint, numbers."""
    (outcome,) = outcomes
    return {
        "spec": outcome.run.spec,
        "checkpoint": outcome.checkpoint,
        "training": outcome.training,
        "evaluation": outcome.evaluation,
    }


@dataclass(frozen=True)
class Benchmark:
    """Everything ``fastmeta bench NAME`` and ``fastmeta eval`` need to know of a benchmark.

    Attributes:
        name: the command's name (``"sine"``).
        help: one line for ``fastmeta bench --help``.
        description: the paragraph of ``fastmeta bench NAME --help``.
        config: its settings dataclass (fields declared with ``setting``).
        quick: what ``--quick`` sets (shown in ``--help``).
        plan: ``plan(config)`` lists the runs to train, in order.
        evaluate: ``evaluate(learner, algorithm, config)``: one learner's numbers, under the
            configuration of its run's ``evaluation``.
        markdown: ``markdown(results)``: the text of ``results.md``.
        figures: ``figures(learners, results, config, out)`` writes the PNG figures and
            returns their paths (``learners`` by run name); ``None`` for none.
        figure_names: the files ``figures`` writes (checked before training).
        entry: ``entry(config, algorithm, outcomes)``: an algorithm's ``results.json`` entry.
        summary: ``summary(results)``: extra top-level entries of ``results.json``.
        eval_options: ``fastmeta eval`` options this benchmark takes, mapped to config fields
            (``{"shots": "eval_shots", ...}``).
        eval_text: ``eval_text(algorithm, evaluation, config)``: the table ``fastmeta eval``
            prints.
        eval_figures: ``eval_figures(learner, algorithm, evaluation, config, directory)``:
            the figures of ``fastmeta eval --plot``.
    """

    name: str
    help: str
    description: str
    config: type[BenchConfig]
    quick: Mapping[str, Any]
    plan: Callable[[Any], list[RunPlan]]
    evaluate: Callable[[MetaLearner, str, Any], dict[str, Any]]
    markdown: Callable[[dict[str, Any]], str]
    figures: Callable[[dict[str, MetaLearner], dict[str, Any], Any, Path], list[Path]] | None
    figure_names: tuple[str, ...]
    eval_options: Mapping[str, str]
    eval_text: Callable[[str, dict[str, Any], Any], str]
    eval_figures: Callable[[MetaLearner, str, dict[str, Any], Any, Path], list[Path]]
    entry: Callable[[Any, str, list[Outcome]], dict[str, Any]] = single_entry
    summary: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def quick_config(self, **overrides: Any) -> BenchConfig:
        """The configuration of ``--quick``, with ``overrides`` on top."""
        return self.config(**{**self.quick, **overrides})

    @property
    def algorithms(self) -> tuple[str, ...]:
        """Every algorithm this benchmark offers, in its order."""
        (found,) = [f for f in fields_of(self.config) if f.name == "algorithms"]
        return tuple(found.choices or found.default)


def names() -> list[str]:
    """The registered benchmarks."""
    return list(MODULES)


def benchmark(name: str) -> Benchmark:
    """The registered benchmark ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists those that are.
    """
    if name not in MODULES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(MODULES)}")
    found = importlib.import_module(MODULES[name]).BENCHMARK
    assert isinstance(found, Benchmark)
    return found

"""``fastmeta bench daml``: the DAML sine experiment of the DAML blog post, on the runner.

Tasks (``fastmeta.data.DomainShiftSinusoid``): the target is ``y = sin(x + b)``, ``b`` in
``{0, π}``, on ``x ∈ [-2π, 2π]``; the only thing the learner sees of a new task is one
unlabelled source input, drawn from ``[π/4, π/2]`` for ``b = 0`` and from
``[-π/2, -π/4]`` for ``b = π``. The model (1-32-32-1 ReLU) adapts in 5 SGD steps
(α = 0.03) on a learned loss: a network over ``[output, h2, h1]`` (65 → 32 → 32 → 1, ReLU)
whose output ``h`` gives the inner loss ``|h|`` (the blog post's ``l1_loss(h, 0)``). The
outer loss is L1 on 4 labelled target pairs per task.

The blog post trains one task at a time with SGD 1e-2 for 275,000 iterations; here the
default is Adam 3e-3 with cosine decay to 0, on meta-batches of 25 tasks on the vectorised
engine, for 8,000 iterations (measured: Adam 1e-3 missed the L1 target in as many).

Evaluation: on ``eval_tasks`` new tasks, adapt on one source input each and compare the
adapted model with both candidate waves on a ``grid_points`` grid over ``[-2π, 2π]``.
Training, checkpoints, ``--resume``, signals and ``torchrun`` are those of every
benchmark (:func:`fastmeta.bench.run_benchmark`).
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from fastmeta.data import BatchMetaCollate, DomainShiftSinusoid, _seeding

from .._learner import MetaLearner
from . import _plots
from ._config import BenchConfig, setting
from ._daml_loss import SeedLossNetwork
from ._protocol import Benchmark, RunPlan, adam
from ._registry import build_learner as _build
from ._runner import run_benchmark
from ._signals import StopFlag

# Targets of the experiment: mean L1 on the grid below this, right wave in at least this share.
TARGET_L1 = 0.05
TARGET_RIGHT_WAVE = 0.99

HIDDEN = (32, 32)
LOSS_HIDDEN = (32, 32)
FEATURES = ("body.3", "body.1")  # h2 then h1, after the output: the blog post's [y, h2, h1]
NUM_SOURCE_PER_TASK = 1
NUM_TRAINING_TASKS = 1_000_000


@dataclass(frozen=True)
class DamlConfig(BenchConfig):
    """Settings of ``fastmeta bench daml``; every field is a command-line flag."""

    algorithms: tuple[str, ...] = setting(("daml",), "learners to train", choices=("daml",))
    iterations: int = setting(8_000, "meta-iterations")
    meta_batch_size: int = setting(25, "tasks per meta-iteration")
    num_target: int = setting(4, "labelled target pairs per training task (the outer loss)")
    inner_lr: float = setting(0.03, "inner SGD learning rate on the learned loss")
    inner_steps: int = setting(5, "inner SGD steps, in training and evaluation")
    meta_lr: float = setting(3e-3, "Adam learning rate of the outer loop, decayed to 0 over "
                             "the run by a cosine schedule")
    eval_tasks: int = setting(1000, "new tasks evaluated")
    grid_points: int = setting(200, "points of the evaluation grid over [-2 pi, 2 pi]")
    seed: int = setting(0, "seed of the weights and training tasks; evaluation tasks use "
                        "seed + 1")
    engine: str = setting("auto", "learner engine", choices=("auto", "vmap", "higher"))
    checkpoint_every: int = setting(1000, "meta-iterations between checkpoints")

    not_shared: ClassVar[tuple[str, ...]] = ("eval_tasks", "grid_points")

    def __post_init__(self) -> None:
        self._validate(
            allowed_algorithms=("daml",),
            counts=("iterations", "meta_batch_size", "num_target", "inner_steps", "eval_tasks",
                    "grid_points", "checkpoint_every"),
            int_lists=(),
            rates=("inner_lr", "meta_lr"),
        )


QUICK = {"iterations": 500, "eval_tasks": 200, "checkpoint_every": 100}


def learner_spec(config: DamlConfig) -> dict[str, Any]:
    """The blog post's model and loss network, for :class:`fastmeta.DAML` (a checkpoint spec)."""
    return {
        "benchmark": "daml",
        "algorithm": "daml",
        "model": {"class": "SineMLP", "kwargs": {"hidden": list(HIDDEN), "init": "fan_in"}},
        "modules": {"adaptation_loss": {
            "class": "SeedLossNetwork",
            "kwargs": {"in_features": 1 + sum(HIDDEN), "hidden": list(LOSS_HIDDEN)},
        }},
        "learner": {"inner_lr": config.inner_lr, "inner_steps": config.inner_steps,
                    "features": list(FEATURES), "loss_fn": "l1", "engine": config.engine},
    }


def build_learner(config: DamlConfig | None = None) -> MetaLearner:
    """The experiment's learner with its initial weights (drawn from ``config.seed``)."""
    config = DamlConfig() if config is None else config
    return _build(learner_spec(config), seed=config.seed)


def training_batches(config: DamlConfig) -> Callable[[int], Any]:
    """``batch(i)``: the tasks of meta-iteration ``i``, a pure function of ``i``.

    The same batches, in the same order, as ``BatchMetaDataLoader(tasks,
    batch_size=meta_batch_size, shuffle=True)`` iterated epoch after epoch: per epoch the
    loader draws its base seed, then the permutation of the tasks (then the empty
    remainder's permutation), all from one generator seeded by the task family's seed.
    """
    tasks = DomainShiftSinusoid(NUM_SOURCE_PER_TASK, config.num_target,
                                num_tasks=NUM_TRAINING_TASKS, seed=config.seed)
    size = config.meta_batch_size
    per_epoch = math.ceil(NUM_TRAINING_TASKS / size)
    generator = torch.Generator()
    generator.manual_seed(_seeding.derive_seed(tasks.initial_seed(), _seeding.STREAM_SAMPLER))
    orders: list[Tensor] = []
    collate = BatchMetaCollate()

    def batch(iteration: int) -> Any:
        epoch, row = divmod(iteration, per_epoch)
        while len(orders) <= epoch:
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # the base seed
            orders.append(torch.randperm(NUM_TRAINING_TASKS, generator=generator))
            torch.randperm(NUM_TRAINING_TASKS, generator=generator)  # the remainder's draw
        tasks.set_epoch(epoch)
        indices = orders[epoch][row * size:(row + 1) * size].tolist()
        return collate(tasks.__getitems__(indices))

    return batch


def plan(config: DamlConfig) -> list[RunPlan]:
    """One run: DAML, Adam with cosine decay to 0 over the run."""
    return [RunPlan(
        name="daml",
        algorithm="daml",
        spec=learner_spec(config),
        iterations=config.iterations,
        batches=lambda: training_batches(config),
        training=config.shared_dict(),
        evaluation=config.as_dict(),
        optimizer=adam(config.meta_lr),
        schedule=lambda optimizer: torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=config.iterations),
    )]


def evaluate(learner: MetaLearner, *, tasks: int, seed: int, grid_points: int = 200,
             steps: int | None = None) -> dict[str, Any]:
    """Adapt on one source input per new task; compare with both waves on the grid.

    ``steps`` inner steps (default: the learner's).

    Returns:
        ``l1`` (mean over tasks of the mean L1 error against the right wave, with its
        95% interval), ``right_wave`` (share of tasks closer to the right wave than to the
        other), the same L1 before adaptation, and the per-phase breakdown.
    """
    data = DomainShiftSinusoid(
        NUM_SOURCE_PER_TASK, grid_points, num_tasks=tasks, target_grid=True, seed=seed,
    )
    parts = data.__getitems__(list(range(tasks)))
    source = torch.stack([t["train"].inputs for t in parts])
    grid = torch.stack([t["test"].inputs for t in parts])
    right = torch.stack([t["test"].targets for t in parts])
    phases = torch.tensor([t["test"].phase for t in parts])
    batch = {"train": [source], "test": [grid, right]}
    with torch.no_grad():
        adapted = learner.adapt_many(batch, steps=steps)
        prediction = adapted(grid)
        before = learner.adapt_many(batch, steps=0)(grid)
    l1 = (prediction - right).abs().mean(dim=(1, 2))
    l1_other = (prediction + right).abs().mean(dim=(1, 2))  # the other wave is -right
    l1_before = (before - right).abs().mean(dim=(1, 2))
    flipped = phases > 1.0

    def summary(values: Tensor) -> dict[str, float]:
        return {
            "mean": float(values.mean()),
            "ci95": float(1.96 * values.std() / math.sqrt(len(values))),
            "median": float(values.median()),
            "max": float(values.max()),
        }

    return {
        "tasks": tasks,
        "grid_points": grid_points,
        "l1": summary(l1),
        "l1_before_adaptation": summary(l1_before),
        "right_wave": float((l1 < l1_other).double().mean()),
        "l1_phase_0": float(l1[~flipped].mean()),
        "l1_phase_pi": float(l1[flipped].mean()),
        "tasks_phase_pi": int(flipped.sum()),
    }


def plot(learner: MetaLearner, path: pathlib.Path, *, seed: int, grid_points: int = 200
         ) -> pathlib.Path:
    """Adapted model against both candidate waves, one panel per phase."""
    plt = _plots.pyplot()
    grid = torch.linspace(-2 * math.pi, 2 * math.pi, grid_points).unsqueeze(1)
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for ax, phase, (low, high) in zip(
        axes, (0.0, math.pi), DomainShiftSinusoid(seed=0).source_ranges
    ):
        source = torch.tensor([[rng.uniform(low, high)]], dtype=torch.float32)
        with torch.no_grad():
            prediction = learner.adapt(source)(grid)
            before = learner(grid)
        x = grid.squeeze(1).numpy()
        ax.plot(x, np.sin(x + phase), label=f"right wave sin(x + {'π' if phase else '0'})")
        ax.plot(x, np.sin(x + math.pi - phase), ":", color="grey", label="other wave")
        ax.plot(x, before.squeeze(1).numpy(), "--", color="tab:green", alpha=0.6,
                label="before adaptation")
        ax.plot(x, prediction.squeeze(1).numpy(), color="tab:red", label="adapted (5 steps)")
        ax.axvline(float(source), color="black", alpha=0.4)
        ax.set_title(f"phase {'π' if phase else '0'}: source input x = {float(source):.2f}")
        ax.set_xlabel("x")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle("DAML: adapted on one unlabelled source input (vertical line)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_learner(learner: MetaLearner, algorithm: str, config: DamlConfig
                     ) -> dict[str, Any]:
    """:func:`evaluate` on the configuration's new tasks, with the targets' verdict."""
    evaluation = evaluate(learner, tasks=config.eval_tasks, seed=config.seed + 1,
                          grid_points=config.grid_points, steps=config.inner_steps)
    evaluation["engine"] = getattr(learner, "engine", config.engine)
    evaluation["targets_met"] = bool(
        evaluation["l1"]["mean"] < TARGET_L1 and evaluation["right_wave"] >= TARGET_RIGHT_WAVE
    )
    return evaluation


def _rows(evaluation: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("mean L1 on the grid, after adaptation",
         f"{evaluation['l1']['mean']:.4f} ± {evaluation['l1']['ci95']:.4f}", f"< {TARGET_L1}"),
        ("mean L1 on the grid, before adaptation",
         f"{evaluation['l1_before_adaptation']['mean']:.4f}", "-"),
        ("tasks closer to the right wave", f"{100 * evaluation['right_wave']:.1f}%",
         f">= {100 * TARGET_RIGHT_WAVE:.0f}%"),
        ("worst task's L1", f"{evaluation['l1']['max']:.4f}", "-"),
    ]


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the experiment's numbers against its targets."""
    entry, cfg = results["algorithms"]["daml"], results["config"]
    ev = entry["evaluation"]
    rows = [*_rows(ev), ("training time", f"{entry['training']['seconds']:.0f} s", "-")]
    lines = [
        "# DAML on sine waves",
        "",
        f"{cfg['iterations']} meta-iterations × {cfg['meta_batch_size']} tasks, "
        f"adam {cfg['meta_lr']} (cosine decay to 0), {cfg['inner_steps']} inner steps "
        f"(α = {cfg['inner_lr']}), engine {ev['engine']}; evaluated on "
        f"{ev['tasks']} new tasks, {ev['grid_points']}-point grid over [-2π, 2π], one "
        f"unlabelled source input each.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"Targets met: {'yes' if ev['targets_met'] else 'no'}.",
    ]
    if results.get("figures"):
        lines += ["", *[f"![{pathlib.Path(f).stem}]({pathlib.Path(f).name})"
                        for f in results["figures"]]]
    return "\n".join(lines) + "\n"


def run_daml(
    config: DamlConfig,
    out: pathlib.Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    stop: StopFlag | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``fastmeta bench daml``: :func:`fastmeta.bench.run_benchmark` of this benchmark.

    Writes ``out/results.json``, ``out/results.md``, ``out/daml_sine.png`` and the
    checkpoint ``out/checkpoints/daml.pt``.
    """
    return run_benchmark(BENCHMARK, config, out, resume=resume, progress=progress, plots=plots,
                         stop=stop, stop_after=stop_after, log=log)


def _figures(learners: dict[str, MetaLearner], results: dict[str, Any], config: DamlConfig,
             out: pathlib.Path) -> list[pathlib.Path]:
    return [plot(learners["daml"], out / "daml_sine.png", seed=config.seed,
                 grid_points=config.grid_points)]


def _eval_text(algorithm: str, evaluation: dict[str, Any], config: DamlConfig) -> str:
    lines = [f"{algorithm}: {evaluation['tasks']} new tasks, one unlabelled source input each"]
    lines += [f"  {name:<40} {value:<18} target {target}"
              for name, value, target in _rows(evaluation)]
    return "\n".join(lines)


BENCHMARK = Benchmark(
    name="daml",
    help="domain-adaptive meta-learning on sine waves (a learned inner loss)",
    description="Meta-train DAML: the phase (0 or pi) of a sine wave is inferred from one "
    "unlabelled source input; 5 inner steps on a learned loss, L1 outer loss.",
    config=DamlConfig,
    quick=QUICK,
    plan=plan,
    evaluate=evaluate_learner,
    markdown=markdown,
    figures=_figures,
    figure_names=("daml_sine.png",),
    eval_options={"steps": "inner_steps", "tasks": "eval_tasks"},
    eval_text=_eval_text,
    eval_figures=lambda learner, algorithm, evaluation, config, directory: [
        plot(learner, directory / f"eval_{algorithm}_sine.png", seed=config.seed,
             grid_points=config.grid_points)],
)

__all__ = ["BENCHMARK", "DamlConfig", "SeedLossNetwork", "build_learner", "evaluate",
           "learner_spec", "markdown", "plot", "run_daml", "training_batches"]

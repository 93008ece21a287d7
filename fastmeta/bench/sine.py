"""``fastmeta bench sine``: the MAML paper's sine-wave regression benchmark.

Every algorithm is meta-trained on the same stream of tasks from the same initial weights,
then fine-tuned on the same held-out tasks. The defaults are the paper's protocol (Finn et
al. 2017, §5.1 and Appendix C): MLP 1-40-40-1 ReLU; K = 10; one inner SGD step α = 0.01;
meta-batch 25; Adam 1e-3; 70,000 meta-iterations; evaluation on 600 new tasks with plain
SGD α = 0.01, query MSE reported as mean ± 95% confidence interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .._learner import MetaLearner
from .._task import TaskBatch, as_task
from ..data import BatchMetaCollate, sinusoid
from . import _plots
from ._config import BenchConfig, setting
from ._evaluate import adapt_quietly, bounded_after, curve_table, fine_tuning_curve
from ._protocol import Benchmark, RunPlan, adam
from ._runner import run_benchmark
from ._seeds import with_seeds
from ._signals import StopFlag
from ._stats import DIVERGENCE_BOUND, format_cell, format_median_cell

SINE_ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp", "imaml", "transfer",
                   "random")
# iMAML is offered but not run by default: 116 ms per meta-iteration on the development
# machine, 13 times MAML (2,000 iterations: 246 s against 30 s).
SINE_DEFAULT = tuple(a for a in SINE_ALGORITHMS if a != "imaml")

# Reported in results.md beside our numbers (Finn et al. 2017, Appendix C, Table 2, K = 5).
PAPER_K5 = {
    "MAML (paper)": {1: 0.67, 5: 0.38, 10: 0.35},
    "pretrained, joint training (paper)": {1: 2.41, 5: 2.23, 10: 2.19},
}

# The wave of the fits figure (A = 4, phase = 1) and the robustness test's support range.
FIT_AMPLITUDE, FIT_PHASE = 4.0, 1.0
ROBUSTNESS_SHOTS, ROBUSTNESS_RANGE = 5, (0.0, 5.0)
EVAL_SEED_OFFSET = 1_000_003  # held-out tasks come from another seed than training tasks
REPTILE_INNER_STEPS = 5
IMAML_INNER_STEPS, IMAML_LAM = 5, 1.0


@dataclass(frozen=True)
class SineConfig(BenchConfig):
    """Settings of ``fastmeta bench sine`` (the MAML paper's protocol by default).

    Every field is a command-line flag (``eval_shots`` is ``--eval-shots``); see each
    field's help for its meaning.
    """

    algorithms: tuple[str, ...] = setting(
        SINE_DEFAULT, "learners to train and compare (imaml only when named: it is slow)",
        choices=SINE_ALGORITHMS)
    preset: str = setting(
        "maml", "task family: maml (A in [0.1, 5], phase in [0, pi], MLP 1-40-40-1 ReLU) or "
        "reptile (phase in [0, 2 pi], MLP 1-64-64-1 tanh)", choices=("maml", "reptile"))
    iterations: int = setting(70_000, "meta-iterations per algorithm")
    meta_batch_size: int = setting(25, "tasks per meta-iteration")
    train_shots: int = setting(10, "support (and query) points per training task: K")
    eval_shots: tuple[int, ...] = setting((5, 10, 20), "support points of the held-out "
                                          "tasks, one evaluation per value")
    eval_steps: int = setting(10, "fine-tuning steps evaluated (0 through this)")
    eval_tasks: int = setting(600, "held-out tasks")
    eval_query: int = setting(100, "query points per held-out task")
    inner_lr: float = setting(0.01, "inner SGD learning rate, in training and evaluation")
    meta_lr: float = setting(1e-3, "Adam learning rate of the outer loop")
    seed: int = setting(0, "seed of the initial weights and of every task draw")
    seeds: int = setting(1, "independent seeds seed, seed+1, ...: one checkpoint each, "
                         "results per seed and across seeds")
    engine: str = setting("auto", "learner engine", choices=("auto", "vmap", "higher"))
    checkpoint_every: int = setting(1000, "meta-iterations between checkpoints")

    # Evaluation settings: they do not change a learner's training.
    # Evaluation settings and --seeds (each seed's runs are checked with their own seed).
    not_shared: ClassVar[tuple[str, ...]] = ("eval_shots", "eval_steps", "eval_tasks",
                                             "eval_query", "seeds")

    def __post_init__(self) -> None:
        self._validate(
            allowed_algorithms=SINE_ALGORITHMS,
            counts=("iterations", "meta_batch_size", "train_shots", "eval_tasks", "eval_query",
                    "checkpoint_every", "seeds"),
            int_lists=("eval_shots",),
            rates=("inner_lr", "meta_lr"),
        )

    def training_dict(self) -> dict[str, Any]:
        """The settings that determine a learner's training (checked on ``--resume``).

        Which other algorithms run beside it, and how often checkpoints are written, do
        not change a learner's training: runs of different algorithm subsets can share one
        output directory and be completed by a final ``--resume`` run over all of them.
        """
        return self.shared_dict()


QUICK = {"iterations": 2000, "eval_tasks": 200, "checkpoint_every": 500}


def quick_config(**overrides: Any) -> SineConfig:
    """The README's main job: the full benchmark with fewer iterations and tasks."""
    return SineConfig(**{**QUICK, **overrides})


MODELS = {
    "maml": {"hidden": [40, 40], "activation": "relu"},
    "reptile": {"hidden": [64, 64], "activation": "tanh"},
}
# Keyword arguments of each learner beyond inner_lr and engine.
LEARNER_OPTIONS: dict[str, dict[str, Any]] = {
    "maml": {"inner_steps": 1},
    "fomaml": {"inner_steps": 1},
    "reptile": {"inner_steps": REPTILE_INNER_STEPS},
    "metasgd": {"inner_steps": 1},
    "anil": {"inner_steps": 1, "head": "head"},
    # MAML++ with the protocol's one step: its learned per-tensor rates (LSLR) are what
    # changes; the MLP has no BatchNorm for per-step weights.
    "mamlpp": {"inner_steps": 1, "per_step_batch_norm": False},
    # iMAML needs several inner steps to approach the proximal optimum (fastmeta's choice
    # of steps and λ; the iMAML paper has no sine benchmark).
    "imaml": {"inner_steps": IMAML_INNER_STEPS, "lam": IMAML_LAM, "cg_steps": 5},
    "transfer": {},
    "random": {},
}


def learner_spec(config: SineConfig, algorithm: str) -> dict[str, Any]:
    """Model and learner settings of ``algorithm`` (stored in its checkpoint)."""
    return {
        "benchmark": "sine",
        "algorithm": algorithm,
        "model": {"class": "SineMLP", "kwargs": dict(MODELS[config.preset])},
        "learner": {"inner_lr": config.inner_lr, "engine": config.engine,
                    **LEARNER_OPTIONS[algorithm]},
    }


def plan(config: SineConfig) -> list[RunPlan]:
    """One run per algorithm, all on the same stream of tasks; ``random`` is not trained."""
    return [
        RunPlan(
            name=algorithm,
            algorithm=algorithm,
            spec=learner_spec(config, algorithm),
            iterations=0 if algorithm == "random" else config.iterations,
            batches=lambda: training_batches(config),
            training=config.training_dict(),
            evaluation=config.as_dict(),
            optimizer=adam(config.meta_lr),
        )
        for algorithm in config.algorithms
    ]


def _collate_all(dataset: Any, start: int, count: int) -> TaskBatch:
    return as_task(BatchMetaCollate()(dataset.__getitems__(list(range(start, start + count)))))


def training_batches(config: SineConfig) -> Callable[[int], TaskBatch]:
    """``batch(i)``: the tasks of meta-iteration ``i``, the same for every algorithm and run."""
    dataset = sinusoid(
        config.train_shots,
        test_shots=config.train_shots,
        preset=config.preset,
        seed=config.seed,
        num_tasks=config.iterations * config.meta_batch_size,
    )

    def batch(iteration: int) -> TaskBatch:
        return _collate_all(dataset, iteration * config.meta_batch_size, config.meta_batch_size)

    return batch


def evaluation_tasks(config: SineConfig, shots: int, **kwargs: Any) -> TaskBatch:
    """The held-out tasks with ``shots`` support points (the same waves for every ``shots``)."""
    dataset = sinusoid(
        shots,
        test_shots=config.eval_query,
        preset=config.preset,
        seed=config.seed + EVAL_SEED_OFFSET,
        num_tasks=config.eval_tasks,
        **kwargs,
    )
    return _collate_all(dataset, 0, config.eval_tasks)


def robustness_tasks(config: SineConfig) -> TaskBatch:
    """Held-out tasks with 5 support points from [0, 5] only and a query grid over the wave."""
    return evaluation_tasks(
        config, ROBUSTNESS_SHOTS, support_range=ROBUSTNESS_RANGE, query_grid=True
    )


def _wave(config: SineConfig, x: torch.Tensor) -> torch.Tensor:
    sign = -1.0 if config.preset == "maml" else 1.0
    return FIT_AMPLITUDE * torch.sin(x + sign * FIT_PHASE)


def fit_task(config: SineConfig, shots: int, support_range: tuple[float, float]) -> TaskBatch:
    """One task on the wave A = 4, phase = 1: seeded support points and a 200-point grid."""
    generator = torch.Generator().manual_seed(config.seed + EVAL_SEED_OFFSET)
    low, high = support_range
    support_x = low + (high - low) * torch.rand(1, shots, 1, generator=generator)
    query_x = torch.linspace(-5.0, 5.0, 200).view(1, 200, 1)
    return TaskBatch(support_x, _wave(config, support_x), query_x, _wave(config, query_x))


def predictions(
    learner: MetaLearner, task: TaskBatch, steps: tuple[int, ...]
) -> dict[str, list[float]]:
    """The model's outputs on ``task``'s query grid after each number of steps."""
    out = {}
    for s in steps:
        adapted = adapt_quietly(learner, task, s)
        with torch.no_grad():
            out[f"after {s} step{'s' if s != 1 else ''}"] = adapted[0](task.query_x[0]).flatten()
    return {label: values.tolist() for label, values in out.items()}


def _fit_panel(learner: MetaLearner, task: TaskBatch, steps: tuple[int, ...]) -> dict[str, Any]:
    assert task.support_y is not None  # fit_task is labelled
    return {
        "x": task.query_x[0].flatten().tolist(),
        "truth": task.query_y[0].flatten().tolist(),
        "support_x": task.support_x[0].flatten().tolist(),
        "support_y": task.support_y[0].flatten().tolist(),
        "predictions": predictions(learner, task, steps),
    }


def evaluate_learner(learner: MetaLearner, config: SineConfig) -> dict[str, Any]:
    """Fine-tuning curves for every ``eval_shots`` and the robustness score of one learner."""
    curves = {
        str(shots): fine_tuning_curve(learner, evaluation_tasks(config, shots), config.eval_steps,
                                      bound=DIVERGENCE_BOUND)
        for shots in config.eval_shots
    }
    robustness = bounded_after(learner, robustness_tasks(config), config.eval_steps,
                               DIVERGENCE_BOUND)
    return {"curves": curves, "robustness": robustness}


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _threads(count: int) -> str:
    return f"{count} thread" + ("s" if count != 1 else "")


def _step_columns(config: SineConfig) -> list[int]:
    return [s for s in (0, 1, 5, 10) if s <= config.eval_steps] + (
        [config.eval_steps] if config.eval_steps not in (0, 1, 5, 10) else []
    )


# Algorithms that fine-tune with rates they learned instead of plain SGD at inner_lr.
LEARNED_RATES = {"metasgd": "Meta-SGD", "mamlpp": "MAML++"}


def _learned_rates_note(names: list[str]) -> str:
    learned = [LEARNED_RATES[n] for n in names if n in LEARNED_RATES]
    return f" ({' and '.join(learned)} with their learned rates)" if learned else ""


def _settings_note(names: list[str]) -> str:
    notes = []
    if "mamlpp" in names:
        notes.append("MAML++ takes the protocol's one inner step (learned per-tensor rates; "
                     "no BatchNorm in the MLP)")
    if "imaml" in names:
        notes.append(f"iMAML {IMAML_INNER_STEPS} steps with λ = {IMAML_LAM}")
    return " " + "; ".join(notes) + "." if notes else ""


def _bound(results: dict[str, Any]) -> str:
    for entry in results["algorithms"].values():
        bound = entry["evaluation"]["robustness"].get("bound")
        if bound is not None:
            return f"{bound:g}"
    return f"{DIVERGENCE_BOUND:g}"


def trained_steps(algorithm: str) -> int | None:
    """Inner steps ``algorithm`` is meta-trained with (``None``: no inner loop in training)."""
    return LEARNER_OPTIONS[algorithm].get("inner_steps")


def _beyond_training(config: SineConfig, results: dict[str, Any]) -> list[str]:
    """One paragraph naming the algorithms evaluated beyond their trained inner steps."""
    trained = {name: trained_steps(name) for name in results["algorithms"]}
    beyond = {n: k for n, k in trained.items() if k is not None and k < config.eval_steps}
    if not beyond:
        return []
    groups: dict[int, list[str]] = {}
    for name, steps in beyond.items():
        groups.setdefault(steps, []).append(name)
    steps_text = "; ".join(f"{', '.join(names)} with {k} inner step{'s' if k != 1 else ''}"
                           for k, names in sorted(groups.items()))
    learned = [LEARNED_RATES[n] for n in beyond if n in LEARNED_RATES]
    learned_steps = min(beyond[n] for n in beyond if n in LEARNED_RATES) if learned else 0
    text = (f"Evaluated beyond their training: {steps_text}, but fine-tuned here for up to "
            f"{config.eval_steps} steps (the MAML paper's protocol). Nothing in "
            f"meta-training shapes the steps after the trained ones, so fine-tuning can "
            f"get worse or diverge there")
    if learned:
        text += (f"; {' and '.join(learned)} repeat the inner learning rates they learned "
                 f"for {learned_steps} step{'s' if learned_steps != 1 else ''}, and a step "
                 f"that suits the trained step count can overshoot when repeated")
    return ["", text + "."]


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: the tables of a sine benchmark's ``results.json``."""
    config = SineConfig.from_dict(results["config"])
    columns = _step_columns(config)
    header = " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in columns)
    names = list(results["algorithms"])
    lines = [
        "# fastmeta bench sine",
        "",
        f"Task family `{config.preset}`; {config.iterations:,} meta-iterations per algorithm, "
        f"meta-batch {config.meta_batch_size}, K = {config.train_shots} support and query "
        f"points in training, inner SGD α = {config.inner_lr}, outer Adam {config.meta_lr}, "
        f"seed {config.seed}. Evaluation: {config.eval_tasks} held-out tasks, "
        f"{config.eval_query} query points each, fine-tuning with plain SGD α = "
        f"{config.inner_lr}{_learned_rates_note(names)}.{_settings_note(names)} "
        f"fastmeta {results['versions']['fastmeta']}, torch "
        f"{results['versions']['torch']}, {_threads(results['versions']['torch_threads'])}; "
        f"wall time {_clock(results['wall_seconds'])}.",
        "",
        f"Each cell: the median query MSE over all tasks, then in parentheses the mean ± 95% "
        f"confidence interval (1.96·std/√n) over the tasks that did not diverge, then how "
        f"many diverged, if any. A task diverged when its query MSE is not finite or is more "
        f"than {_bound(results)}× its query MSE before fine-tuning; the median counts a "
        f"diverged task as larger than every other and reads \"diverged\" when half or more "
        f"did.",
        *_beyond_training(config, results),
    ]
    for shots in config.eval_shots:
        lines += [
            "",
            f"## K = {shots} support points",
            "",
            f"| algorithm | {header} |",
            "|---|" + "---|" * len(columns),
        ]
        for name, entry in results["algorithms"].items():
            summaries = entry["evaluation"]["curves"][str(shots)]["summaries"]
            cells = " | ".join(format_median_cell(summaries[s]) for s in columns)
            lines.append(f"| {name} | {cells} |")
        if shots == 5 and config.preset == "maml":
            for name, row in PAPER_K5.items():
                cells = " | ".join(f"(mean {row[s]:.2f})" if s in row else "" for s in columns)
                lines.append(f"| *{name}* | {cells} |")
    lines += [
        "",
        f"## Robustness: {ROBUSTNESS_SHOTS} support points from {list(ROBUSTNESS_RANGE)} only, "
        f"{config.eval_steps} steps, MSE over the whole wave",
        "",
        "| algorithm | median (mean ± 95% CI), diverged |",
        "|---|---|",
    ]
    for name, entry in results["algorithms"].items():
        summary = entry["evaluation"]["robustness"]
        lines.append(f"| {name} | {format_median_cell(summary)} |")
    lines += [
        "",
        "## Training speed",
        "",
        "| algorithm | ms per meta-iteration (median) | training time |",
        "|---|---|---|",
    ]
    for name, entry in results["algorithms"].items():
        training = entry["training"]
        ms = training["ms_per_iteration"]
        lines.append(
            f"| {name} | {'-' if ms is None else f'{ms:.2f}'} | {_clock(training['seconds'])} |"
        )
    total = sum(entry["training"]["seconds"] for entry in results["algorithms"].values())
    lines += ["", f"Training time summed over the algorithms: {_clock(total)}."]
    ratio = results["speed"].get("first_order_over_second_order")
    if ratio is not None:
        lines += [
            "",
            f"First-order MAML takes {ratio:.2f}× the time of second-order MAML per "
            f"meta-iteration ({100 * (1 - ratio):.0f}% faster).",
        ]
    if results.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{Path(f).stem}]({Path(f).name})" for f in results["figures"]]
    return "\n".join(lines) + "\n"


def run_sine(
    config: SineConfig,
    out: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    plots: bool = True,
    stop: StopFlag | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``fastmeta bench sine``: :func:`fastmeta.bench.run_benchmark` of this benchmark."""
    return run_benchmark(BENCHMARK, config, out, resume=resume, progress=progress, plots=plots,
                         stop=stop, stop_after=stop_after, log=log)


def _speed(results: dict[str, Any]) -> dict[str, Any]:
    algorithms = results["algorithms"]
    ms = {name: entry["training"]["ms_per_iteration"] for name, entry in algorithms.items()}
    speed: dict[str, Any] = {"ms_per_iteration": ms}
    if ms.get("maml") and ms.get("fomaml"):
        speed["first_order_over_second_order"] = ms["fomaml"] / ms["maml"]
    return {"speed": speed}


def _figures(
    learners: dict[str, MetaLearner], results: dict[str, Any], config: SineConfig, out: Path
) -> list[Path]:
    panels = {
        f"K = {shots}": {
            name: entry["evaluation"]["curves"][str(shots)]
            for name, entry in results["algorithms"].items()
        }
        for shots in config.eval_shots
    }
    paths = [
        _plots.curves(
            panels,
            out / "fine_tuning_curves.png",
            ylabel="query MSE, median over tasks",
            title=f"Fine-tuning on {config.eval_tasks} held-out sine tasks (means: results.md)",
            log=True,
            median=True,
        )
    ]
    paths.append(fit_figure(learners, config, out))
    robust = fit_task(config, ROBUSTNESS_SHOTS, ROBUSTNESS_RANGE)
    paths.append(
        _plots.fits(
            {
                name: _fit_panel(learner, robust, (0, config.eval_steps))
                for name, learner in learners.items()
            },
            out / "robustness.png",
            title=f"Robustness: {ROBUSTNESS_SHOTS} points from x in {list(ROBUSTNESS_RANGE)} only,"
            f" {config.eval_steps} steps",
        )
    )
    return paths


def _number(value: float | str) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


def fit_figure(
    learners: dict[str, MetaLearner],
    config: SineConfig,
    out: Path,
    *,
    name: str = "fits.png",
    shots: int | None = None,
) -> Path:
    """Fits to the wave A = 4, phase = 1 from K = ``shots`` points (default ``train_shots``)."""
    shots = config.train_shots if shots is None else shots
    steps = tuple(sorted({0, 1, config.eval_steps}))
    task = fit_task(config, shots, (-5.0, 5.0))
    sign = "-" if config.preset == "maml" else "+"
    return _plots.fits(
        {label: _fit_panel(learner, task, steps) for label, learner in learners.items()},
        out / name,
        title=f"Fits to y = {FIT_AMPLITUDE:g}·sin(x {sign} {FIT_PHASE:g}) from K = "
        f"{shots} points",
    )


def _eval_text(algorithm: str, evaluation: dict[str, Any], config: SineConfig) -> str:
    curves = {f"K={k}": evaluation["curves"][str(k)] for k in config.eval_shots}
    robustness = evaluation["robustness"]
    return (
        curve_table(algorithm, "query MSE", curves)
        + f"\n{algorithm}, robustness ({ROBUSTNESS_SHOTS} points from "
        f"{list(ROBUSTNESS_RANGE)}, {config.eval_steps} steps): median "
        f"{format_median_cell(robustness, digits=4)}"
    )


def _eval_figures(learner: MetaLearner, algorithm: str, evaluation: dict[str, Any],
                  config: SineConfig, directory: Path) -> list[Path]:
    panels = {f"K={k}": {algorithm: evaluation["curves"][str(k)]} for k in config.eval_shots}
    curves = _plots.curves(
        panels, directory / f"eval_{algorithm}_curves.png",
        ylabel="query MSE, median over tasks",
        title=f"{algorithm}: fine-tuning on {config.eval_tasks} held-out tasks",
        log=True, median=True,
    )
    fits = [
        fit_figure({algorithm: learner}, config, directory, shots=shots,
                   name=f"eval_{algorithm}_fits_K{shots}.png")
        for shots in config.eval_shots
    ]
    return [curves, *fits]


_PAPER_ROWS = {"maml": "MAML (paper)", "transfer": "pretrained, joint training (paper)"}


def against_paper(results: dict[str, Any]) -> list[str]:
    """Per K = 5 cell of the MAML paper: the seeds at or below it, and the mean across seeds."""
    lines = ["### Against the MAML paper (K = 5)", ""]
    for algorithm, row in _PAPER_ROWS.items():
        entry = results["algorithms"].get(algorithm)
        if entry is None or "5" not in entry["across_seeds"].get("curves", {}):
            continue
        curve = entry["across_seeds"]["curves"]["5"]
        for step, published in PAPER_K5[row].items():
            if step >= len(curve["summaries"]):
                continue
            found = curve["summaries"][step]
            means = found["per_seed"]
            below = sum(1 for m in means if m <= published)
            mean = found["mean"]
            verdict = ("at or below" if mean is not None and mean <= published else "above")
            lines.append(
                f"- {algorithm}, {step} step{'s' if step > 1 else ''}: {below} of "
                f"{found['seeds']} seeds at or below the paper's {published} (seed means "
                f"{', '.join(_number(m) for m in means)}); the mean across seeds, "
                f"{_number(mean) if mean is not None else 'not finite'}, is {verdict} it")
    return lines if len(lines) > 2 else []


BENCHMARK = with_seeds(Benchmark(
    name="sine",
    help="sine-wave regression: the MAML paper's protocol",
    description="Meta-train each algorithm on sine-wave tasks and evaluate them all on the "
    "same held-out tasks. Defaults: the MAML paper (Finn et al. 2017, section 5.1).",
    config=SineConfig,
    quick=QUICK,
    plan=plan,
    evaluate=lambda learner, algorithm, config: evaluate_learner(learner, config),
    markdown=markdown,
    figures=_figures,
    figure_names=("fine_tuning_curves.png", "fits.png", "robustness.png"),
    summary=_speed,
    eval_options={"shots": "eval_shots", "steps": "eval_steps", "tasks": "eval_tasks"},
    eval_text=_eval_text,
    eval_figures=_eval_figures,
), format_cell, against_paper)

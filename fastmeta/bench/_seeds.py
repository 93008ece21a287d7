"""``--seeds N``: a benchmark repeated over independent seeds, with results across seeds.

:func:`with_seeds` turns a :class:`~fastmeta.bench.Benchmark` whose configuration has a
``seeds`` field into one that, for ``seeds > 1``, trains every run once per seed
``seed, seed + 1, ..., seed + N - 1`` (own initial weights, training tasks and held-out
tasks; own checkpoint ``<run>-seed<s>.pt``, resumable like any other), keeps each seed's
results as the single-seed benchmark writes them, and adds, for every cell, the mean of
the per-seed means with a 95% Student-t interval across seeds, the median of the per-seed
medians and the diverged tasks summed over seeds. With ``seeds == 1`` nothing changes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._learner import MetaLearner
from ._protocol import Benchmark, Outcome, RunPlan
from ._stats import format_median

# Two-sided 95% quantiles of Student's t with 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(dof: int) -> float:
    """The two-sided 95% quantile of Student's t with ``dof`` degrees of freedom."""
    return _T95[dof - 1] if dof <= len(_T95) else 1.96


def seed_list(config: Any) -> list[int]:
    """The seeds of a run: ``seed, seed + 1, ..., seed + seeds - 1``."""
    return [config.seed + k for k in range(config.seeds)]


def across_seeds(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell across seeds, from each seed's ``summarize`` of that cell.

    Returns:
        ``{"mean", "ci95", "median", "diverged", "tasks", "seeds", "per_seed"}``: the
        mean of the per-seed means and its 95% Student-t interval
        (``t·std/√n`` over the seeds whose mean is finite), the median of the per-seed
        medians, and the diverged and evaluated tasks summed over seeds.
    """
    means = [s["mean"] for s in summaries if s["mean"] is not None]
    n = len(means)
    mean = statistics.fmean(means) if n else None
    ci95 = t95(n - 1) * statistics.stdev(means) / math.sqrt(n) if n > 1 else (
        0.0 if n else None)
    return {
        "mean": mean,
        "ci95": ci95,
        "median": statistics.median(float(s["median"]) for s in summaries),  # JSON: "inf"
        "diverged": sum(s["diverged"] for s in summaries),
        "tasks": sum(s["tasks"] for s in summaries),
        "seeds": len(summaries),
        "per_seed": means,
    }


def _combine(evaluations: list[Any]) -> Any:
    """Walk the seeds' evaluation trees in step; every ``summaries`` list becomes cells."""
    first = evaluations[0]
    if isinstance(first, dict) and {"mean", "ci95", "median", "diverged"} <= set(first):
        return across_seeds(evaluations)
    if isinstance(first, dict):
        return {k: _combine([e[k] for e in evaluations]) for k in first
                if all(isinstance(e, dict) and k in e for e in evaluations)}
    lists = isinstance(first, list) and all(isinstance(e, list) for e in evaluations)
    if lists and first and isinstance(first[0], dict) and all(
            len(e) == len(first) for e in evaluations):
        return [_combine([e[i] for e in evaluations]) for i in range(len(first))]
    return first  # steps and other labels are the same for every seed


def _per_seed_results(results: dict[str, Any], seed: int) -> dict[str, Any]:
    """The results of one seed, shaped as the single-seed benchmark writes them."""
    config = {**results["config"], "seed": seed, "seeds": 1}
    algorithms = {name: entry["seeds"][str(seed)] for name, entry in results["algorithms"].items()}
    extra = results.get("per_seed_summary", {}).get(str(seed), {})
    return {**results, **extra, "config": config, "algorithms": algorithms}


def with_seeds(benchmark: Benchmark, cell: Callable[[dict[str, Any]], str],
               versus: Callable[[dict[str, Any]], list[str]] | None = None) -> Benchmark:
    """``benchmark`` with ``--seeds N`` (see the module docstring).

    Args:
        benchmark: a benchmark whose configuration has ``seed`` and ``seeds`` fields.
        cell: formats one across-seeds cell of ``results.md``.
        versus: markdown lines placed under the across-seeds table (published values
            against the seeds), from the whole results.
    """
    inner = benchmark

    def single(config: Any, seed: int) -> Any:
        return config.replace(seed=seed, seeds=1)

    def plan(config: Any) -> list[RunPlan]:
        if config.seeds == 1:
            return inner.plan(config)
        return [dataclasses.replace(run, name=f"{run.name}-seed{seed}", seed=seed)
                for seed in seed_list(config) for run in inner.plan(single(config, seed))]

    def entry(config: Any, algorithm: str, outcomes: list[Outcome]) -> dict[str, Any]:
        if config.seeds == 1:
            return inner.entry(config, algorithm, outcomes)
        per_seed = {}
        for seed in seed_list(config):
            mine = [o for o in outcomes if o.run.seed == seed]
            stripped = [dataclasses.replace(o, run=dataclasses.replace(
                o.run, name=o.run.name.removesuffix(f"-seed{seed}"))) for o in mine]
            # the checkpoint paths stay those of that seed's own files
            per_seed[str(seed)] = inner.entry(single(config, seed), algorithm, stripped)
        evaluation = _combine([per_seed[str(s)]["evaluation"] for s in seed_list(config)])
        return {"seeds": per_seed, "across_seeds": evaluation}

    def summary(results: dict[str, Any]) -> dict[str, Any]:
        config: Any = inner.config.from_dict(results["config"])
        if inner.summary is None:
            return {}
        if config.seeds == 1:
            return inner.summary(results)
        return {"per_seed_summary": {
            str(seed): inner.summary({**results, "config": {**results["config"], "seed": seed,
                                                            "seeds": 1},
                                      "algorithms": {n: e["seeds"][str(seed)] for n, e in
                                                     results["algorithms"].items()}})
            for seed in seed_list(config)}}

    def markdown(results: dict[str, Any]) -> str:
        config: Any = inner.config.from_dict(results["config"])
        if config.seeds == 1:
            return inner.markdown(results)
        seeds = seed_list(config)
        lines = [
            f"# fastmeta bench {inner.name}, {config.seeds} seeds",
            "",
            f"Seeds {seeds[0]} to {seeds[-1]}, each with its own initial weights, training "
            f"tasks and held-out tasks, and its own checkpoints. Across seeds: the mean of "
            f"the {config.seeds} per-seed means ± 95% Student-t interval "
            f"(t·std/√{config.seeds}), then the median of the per-seed medians and the "
            f"diverged tasks summed over seeds. Each seed's own tables follow"
            + (" (the figures are the first seed's)." if inner.figures is not None else "."),
            "",
            "## Across seeds",
            "",
            "| algorithm | cell | mean ± 95% (seeds) | median | diverged | per-seed means |",
            "|---|---|---|---|---|---|",
        ]
        for name, found in results["algorithms"].items():
            for label, summary in _cells(found["across_seeds"]):
                per_seed = ", ".join(f"{m:.3g}" if abs(m) >= 1e4 else f"{m:.3f}"
                                     for m in summary["per_seed"])
                median = format_median(summary["median"])
                lines.append(f"| {name} | {label} | {cell(summary)} | {median} "
                             f"| {summary['diverged']}/{summary['tasks']} | {per_seed} |")
        if versus is not None:
            lines += ["", *versus(results)]
        for seed in seeds:
            text = inner.markdown(_per_seed_results(results, seed))
            demoted = ["#" + line if line.startswith("#") else line for line in text.splitlines()
                       if not line.startswith("![")]  # the figures: once, below
            lines += ["", *demoted]
        if results.get("figures"):
            lines += ["", *[f"![{Path(f).stem}]({Path(f).name})" for f in results["figures"]]]
        return "\n".join(lines) + "\n"

    figures = inner.figures
    wrapped_figures = None
    if figures is not None:
        def wrapped_figures(learners: dict[str, MetaLearner], results: dict[str, Any],
                            config: Any, out: Path) -> list[Path]:
            if config.seeds == 1:
                return figures(learners, results, config, out)
            seed = config.seed
            suffix = f"-seed{seed}"
            mine = {n.removesuffix(suffix): learner for n, learner in learners.items()
                    if n.endswith(suffix)}
            return figures(mine, _per_seed_results(results, seed), single(config, seed), out)

    return dataclasses.replace(benchmark, plan=plan, entry=entry, summary=summary,
                               markdown=markdown, figures=wrapped_figures)


def _cells(tree: Any, label: str = "") -> list[tuple[str, dict[str, Any]]]:
    """``(label, cell)`` of every across-seeds cell: the last step of each curve, and
    every other cell by its path."""
    if isinstance(tree, dict) and "per_seed" in tree:
        return [(label, tree)]
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(tree, dict):
        if "summaries" in tree and "steps" in tree:
            steps, cells = tree["steps"], tree["summaries"]
            for index in sorted({0, len(cells) - 1}):
                found.append((f"{label}, {steps[index]} steps" if label else
                              f"{steps[index]} steps", cells[index]))
            return found
        for key, value in tree.items():
            if key == "curves":  # a grouping key, not a setting: keep labels short
                found += _cells(value, label)
            else:
                found += _cells(value, f"{label}, {key}" if label else str(key))
    return found

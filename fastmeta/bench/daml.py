"""The DAML sine experiment of the seed blog post, written once for the CLI and the example.

Tasks (``fastmeta.data.DomainShiftSinusoid``): the target is ``y = sin(x + b)``, ``b`` in
``{0, π}``, on ``x ∈ [-2π, 2π]``; the only thing the learner sees of a new task is one
unlabelled source input, drawn from ``[π/4, π/2]`` for ``b = 0`` and from
``[-π/2, -π/4]`` for ``b = π``. The model (1-32-32-1 ReLU) adapts in 5 SGD steps
(α = 0.03) on a learned loss: a network over ``[output, h2, h1]`` (65 → 32 → 32 → 1, ReLU)
whose output ``h`` gives the inner loss ``|h|`` (the seed's ``l1_loss(h, 0)``). The outer
loss is L1 on 4 labelled target pairs per task.

The seed trains one task at a time with SGD 1e-2 for 275,000 iterations; here the
default is Adam 3e-3 with cosine decay to 0, on meta-batches of 25 tasks on the vectorised
engine, for 8,000 iterations (measured: Adam 1e-3 missed the L1 target in as many).

Evaluation: on ``eval_tasks`` new tasks, adapt on one source input each and compare the
adapted model with both candidate waves on a 200-point grid over ``[-2π, 2π]``.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import fastmeta
from fastmeta.bench._config import versions
from fastmeta.data import BatchMetaDataLoader, DomainShiftSinusoid

# Targets of the issue: mean L1 on the grid below this, right wave in at least this share.
TARGET_L1 = 0.05
TARGET_RIGHT_WAVE = 0.99

DEFAULTS: dict[str, Any] = {
    "hidden": (32, 32),
    "loss_hidden": (32, 32),
    "features": ("body.3", "body.1"),  # h2 then h1, after the output: the seed's [y, h2, h1]
    "inner_lr": 0.03,
    "inner_steps": 5,
    "outer_optimizer": "adam",
    "outer_lr": 3e-3,
    "outer_lr_schedule": "cosine",  # decays to 0 over the run: a steadier final model
    "meta_batch_size": 25,
    "num_source_per_task": 1,
    "num_target_per_task": 4,
    "grid_points": 200,
    "iterations": 8_000,
    "quick_iterations": 500,
    "quick_eval_tasks": 200,
}


class SeedLossNetwork(nn.Module):
    """The seed's adaptation-loss network: ``|MLP([output, h2, h1])|``, averaged.

    Weights are drawn U(±1/√fan_in) and biases are zero, as in the seed.

    Args:
        in_features: size of ``[output, h2, h1]`` (1 + 32 + 32 in the seed).
        hidden: widths of the hidden layers.
    """

    def __init__(self, in_features: int = 65, hidden: tuple[int, ...] = (32, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for next_width in hidden:
            layers += [nn.Linear(width, next_width), nn.ReLU()]
            width = next_width
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        for module in self.net:
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, output: Tensor, *features: Tensor) -> Tensor:
        """Mean of ``|h|`` over the examples (the seed's ``l1_loss(h, 0)``)."""
        return self.net(torch.cat([output, *features], dim=-1)).abs().mean()


def build_learner(seed: int = 0, engine: str = "auto") -> fastmeta.DAML:
    """The seed's model and loss network, wrapped in :class:`fastmeta.DAML`."""
    torch.manual_seed(seed)
    hidden = DEFAULTS["hidden"]
    model = fastmeta.models.SineMLP(hidden=hidden, init="fan_in")
    loss_net = SeedLossNetwork(1 + sum(hidden), DEFAULTS["loss_hidden"])
    return fastmeta.DAML(
        model,
        adaptation_loss=loss_net,
        inner_lr=DEFAULTS["inner_lr"],
        inner_steps=DEFAULTS["inner_steps"],
        features=DEFAULTS["features"],
        loss_fn="l1",
        engine=engine,
    )


def evaluate(learner: fastmeta.DAML, *, tasks: int, seed: int) -> dict[str, Any]:
    """Adapt on one source input per new task; compare with both waves on the grid.

    Returns:
        ``l1`` (mean over tasks of the mean L1 error against the right wave, with its
        95% interval), ``right_wave`` (share of tasks closer to the right wave than to the
        other), the same L1 before adaptation, and the per-phase breakdown.
    """
    data = DomainShiftSinusoid(
        DEFAULTS["num_source_per_task"], DEFAULTS["grid_points"], num_tasks=tasks,
        target_grid=True, seed=seed,
    )
    parts = data.__getitems__(list(range(tasks)))
    source = torch.stack([t["train"].inputs for t in parts])
    grid = torch.stack([t["test"].inputs for t in parts])
    right = torch.stack([t["test"].targets for t in parts])
    phases = torch.tensor([t["test"].phase for t in parts])
    batch = {"train": [source], "test": [grid, right]}
    with torch.no_grad():
        adapted = learner.adapt_many(batch)
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
        "grid_points": DEFAULTS["grid_points"],
        "l1": summary(l1),
        "l1_before_adaptation": summary(l1_before),
        "right_wave": float((l1 < l1_other).double().mean()),
        "l1_phase_0": float(l1[~flipped].mean()),
        "l1_phase_pi": float(l1[flipped].mean()),
        "tasks_phase_pi": int(flipped.sum()),
    }


def plot(learner: fastmeta.DAML, path: pathlib.Path, *, seed: int) -> None:
    """Adapted model against both candidate waves, one panel per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-2 * math.pi, 2 * math.pi, DEFAULTS["grid_points"]).unsqueeze(1)
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


def _markdown(results: dict[str, Any]) -> str:
    ev, cfg = results["evaluation"], results["config"]
    rows = [
        ("mean L1 on the grid, after adaptation",
         f"{ev['l1']['mean']:.4f} ± {ev['l1']['ci95']:.4f}", f"< {TARGET_L1}"),
        ("mean L1 on the grid, before adaptation",
         f"{ev['l1_before_adaptation']['mean']:.4f}", "-"),
        ("tasks closer to the right wave", f"{100 * ev['right_wave']:.1f}%",
         f">= {100 * TARGET_RIGHT_WAVE:.0f}%"),
        ("worst task's L1", f"{ev['l1']['max']:.4f}", "-"),
        ("training time", f"{results['training']['seconds']:.0f} s", "-"),
    ]
    lines = [
        "# DAML on sine waves",
        "",
        f"{cfg['iterations']} meta-iterations × {cfg['meta_batch_size']} tasks, "
        f"{cfg['outer_optimizer']} {cfg['outer_lr']}, {cfg['inner_steps']} inner steps "
        f"(α = {cfg['inner_lr']}), engine {results['training']['engine']}; evaluated on "
        f"{ev['tasks']} new tasks, {ev['grid_points']}-point grid over [-2π, 2π], one "
        f"unlabelled source input each.",
        "",
        "| metric | value | target |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in rows),
        "",
        f"Targets met: {'yes' if results['targets_met'] else 'no'}.",
        "",
    ]
    return "\n".join(lines)


def run_daml(
    out: pathlib.Path,
    *,
    iterations: int | None = None,
    quick: bool = False,
    seed: int = 0,
    eval_tasks: int = 1000,
    engine: str = "auto",
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Meta-train DAML on the seed's sine tasks, evaluate, write the results to ``out``.

    Writes ``out/results.json`` (config, every number, versions, training time),
    ``out/results.md`` (a short table) and ``out/daml_sine.png``.

    Args:
        out: output folder (created if needed).
        iterations: meta-iterations; default 8,000 (500 with ``quick``).
        quick: a short run for a smoke test (under a minute); also evaluates on at
            most 200 tasks.
        seed: seed of the initialisation and the training tasks; evaluation tasks use
            ``seed + 1``.
        eval_tasks: number of new tasks to evaluate on.
        engine: ``"auto"``, ``"vmap"`` or ``"higher"``.
        progress: called as ``progress(iteration, total, loss)`` during training.

    Returns:
        The dictionary written to ``results.json``.

    Raises:
        ValueError: ``iterations`` or ``eval_tasks`` below 1.
    """
    if iterations is None:
        iterations = DEFAULTS["quick_iterations"] if quick else DEFAULTS["iterations"]
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if isinstance(eval_tasks, bool) or not isinstance(eval_tasks, int) or eval_tasks < 1:
        raise ValueError(f"eval_tasks must be an int >= 1, got {eval_tasks!r}")
    if quick:
        eval_tasks = min(eval_tasks, DEFAULTS["quick_eval_tasks"])
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and fair on a shared machine
    try:
        return _run(out, iterations, quick, seed, eval_tasks, engine, progress)
    finally:
        torch.set_num_threads(threads)


def _run(
    out: pathlib.Path,
    iterations: int,
    quick: bool,
    seed: int,
    eval_tasks: int,
    engine: str,
    progress: Callable[[int, int, float], None] | None,
) -> dict[str, Any]:
    learner = build_learner(seed, engine)
    optimizer = torch.optim.Adam(learner.parameters(), lr=DEFAULTS["outer_lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    tasks = DomainShiftSinusoid(
        DEFAULTS["num_source_per_task"], DEFAULTS["num_target_per_task"], seed=seed
    )
    loader = BatchMetaDataLoader(tasks, batch_size=DEFAULTS["meta_batch_size"], shuffle=True)
    every = max(1, iterations // 100)
    curve: list[tuple[int, float]] = []
    running, count = 0.0, 0
    start = time.perf_counter()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for iteration, batch in enumerate(itertools.islice(batches, iterations), start=1):
        loss = learner.meta_step(batch, optimizer).loss
        schedule.step()
        running, count = running + loss, count + 1
        if iteration % every == 0 or iteration == iterations:
            curve.append((iteration, running / count))
            running, count = 0.0, 0
            if progress is not None:
                progress(iteration, iterations, loss)
    seconds = time.perf_counter() - start

    evaluation = evaluate(learner, tasks=eval_tasks, seed=seed + 1)
    plot(learner, out / "daml_sine.png", seed=seed)
    config = {
        **{k: v for k, v in DEFAULTS.items() if not k.startswith("quick_")},
        "iterations": iterations,
        "quick": quick,
        "seed": seed,
        "eval_tasks": eval_tasks,
        "loss_fn": "l1",
        "inner_loss": "|loss_net([output, h2, h1])| averaged over the source inputs",
    }
    results: dict[str, Any] = {
        "experiment": "daml_sine",
        "config": config,
        "training": {
            "seconds": seconds,
            "ms_per_iteration": 1000 * seconds / iterations,
            "engine": learner.engine,
            "final_meta_loss": curve[-1][1],
            "meta_loss_curve": curve,
        },
        "evaluation": evaluation,
        "targets": {"l1_below": TARGET_L1, "right_wave_at_least": TARGET_RIGHT_WAVE},
        "targets_met": bool(
            evaluation["l1"]["mean"] < TARGET_L1 and evaluation["right_wave"] >= TARGET_RIGHT_WAVE
        ),
        "versions": versions(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(results))
    return results

"""fastmeta's engines against a plain per-task loop, at the scales users run, side by side.

Usage:
    python benchmarks/scale.py                 # every configuration, 3 rounds, memory
    python benchmarks/scale.py --quick         # smaller meta-batches
    python benchmarks/scale.py --only omniglot --device cuda
    python benchmarks/scale.py --overhead      # fixed costs on the sine MLP, eager and compiled

Configurations (second-order MAML unless said; float32; one thread on CPU):

- ``omniglot``: Conv-4 with 64 channels, 1×28×28, 5-way 1-shot, 5 query per class,
  meta-batch 32, 1 inner step, α = 0.4 (the MAML paper's Omniglot protocol);
- ``miniimagenet``: Conv-4 with 32 channels, 3×84×84, 5-way 1-shot, 15 query per class,
  meta-batch 4, 5 inner steps, α = 0.01 (its miniImageNet protocol);
- ``resnet12``: ResNet-12 (64-160-320-640) at the miniImageNet shape, 5-way 1-shot, 15 query
  per class, meta-batch 2, 1 step, α = 0.01 (``--quick``: one task at the CIFAR-FS shape,
  3×32×32, 2 query per class);
- ``transformer``: an embedding, a Transformer encoder layer (d = 32) and a linear head on
  16 tokens, 5-way 5-shot, meta-batch 4, 1 step;
- ``sine``: the MAML paper's 1-40-40-1 MLP, K = 10, meta-batch 25, 1 step.

Rows: three references written here, on their own copies of the same model: the plain
per-task loop (``functional_call`` + ``torch.autograd.grad`` per task, ``backward`` per
task; every ratio is relative to it), a hand-written ``torch.func`` loop (``grad`` inside
``vmap`` over the tasks, one backward, torch's batching rules trusted as they are) and a
plain higher loop (``innerloop_ctx`` per task); then fastmeta's ``auto`` (after its check
and its tuning steps), ``vmap``, ``loop`` and ``higher`` engines. ``--first-order`` runs
first-order MAML in every row. Each row is one whole meta-iteration: zeroing the gradients,
the meta-gradient and an outer SGD step (learning rate 0, so every round sees the same
model). Each round times every row once, in an order drawn afresh, on the same batch (a
configuration whose step is short gets more rounds, up to about a second of each row); the
table shows the median time and the median over rounds of the ratio to the
plain loop (> 1: faster). Before timing, every row's meta-gradient is compared with the
plain loop's run in float64 on the same model and batch, relative to its largest entry; a
row is flagged where its error is over 10 times the float32 plain loop's own (which reaches
1e-2 on the miniImageNet shape: five inner steps through BatchNorm) and over 1e-4. The test
suite checks exactness in float64. Peak memory: the resident-set high-water mark of one
meta-step in a fresh process run with ``MALLOC_MMAP_THRESHOLD_=65536`` (so that freed
tensors return to the OS and the mark follows live memory; on CUDA,
``torch.cuda.max_memory_allocated``), for every row (``--quick``: the plain loop and
``auto``), and beside it the peak over the whole run from the first meta-step (``auto``'s
check and tuning steps included, where its first steps may run other engines); these
processes run after all the timing, two at a time on a CPU
(``--memory-jobs``), so the table is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta

TARGET_SPEED, TARGET_MEMORY = 0.95, 1.5
# A row's float32 meta-gradient "differs" when its error against the float64 plain loop
# is over DIFFERS times the float32 plain loop's own (and over DIFFERS_AT_LEAST); the test
# suite checks exactness in float64.
DIFFERS, DIFFERS_AT_LEAST = 10.0, 1e-4
MAX_ROUNDS = 200
MAX_TUNING_STEPS = 20  # auto's tuner chooses after 7 meta-steps per batch shape


@dataclass(frozen=True)
class Config:
    model: Callable[[], nn.Module]
    batch: Callable[[int], fastmeta.TaskBatch]
    tasks: int
    quick_tasks: int
    inner_lr: float
    steps: int
    loss: str
    # --quick: a smaller shape where the full one costs seconds per meta-step on a CPU
    quick_batch: Callable[[int], fastmeta.TaskBatch] | None = None
    quick_shape: str = ""

    def batch_for(self, tasks: int, quick: bool) -> fastmeta.TaskBatch:
        return (self.quick_batch if quick and self.quick_batch else self.batch)(tasks)


def _images(channels: int, size: int, ways: int, shots: int, query: int
            ) -> Callable[[int], fastmeta.TaskBatch]:
    def batch(tasks: int) -> fastmeta.TaskBatch:
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(ways)
        return fastmeta.TaskBatch(
            torch.randn(tasks, ways * shots, channels, size, size, generator=g),
            labels.repeat_interleave(shots).repeat(tasks, 1),
            torch.randn(tasks, ways * query, channels, size, size, generator=g),
            labels.repeat_interleave(query).repeat(tasks, 1))

    return batch


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32, padding_idx=0)
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                                  batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(ids)).mean(1))


def _tokens(tasks: int) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(5).repeat(tasks, 1)
    return fastmeta.TaskBatch(torch.randint(1, 100, (tasks, 25, 16), generator=g), labels,
                              torch.randint(1, 100, (tasks, 25, 16), generator=g), labels)


def _sine(tasks: int) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(0)
    return fastmeta.TaskBatch(*(torch.randn(tasks, 10, 1, generator=g) for _ in range(4)))


CONFIGS = {
    "omniglot": Config(lambda: fastmeta.models.Conv4(in_channels=1, num_classes=5, hidden=64,
                                                     image_size=28),
                       _images(1, 28, 5, 1, 5), 32, 4, 0.4, 1, "cross_entropy"),
    "miniimagenet": Config(lambda: fastmeta.models.Conv4(in_channels=3, num_classes=5,
                                                         hidden=32, image_size=84),
                           _images(3, 84, 5, 1, 15), 4, 1, 0.01, 5, "cross_entropy"),
    "resnet12": Config(lambda: fastmeta.models.ResNet12(in_channels=3, num_classes=5),
                       _images(3, 84, 5, 1, 15), 2, 1, 0.01, 1, "cross_entropy",
                       quick_batch=_images(3, 32, 5, 1, 2),
                       quick_shape="CIFAR-FS shape 3×32×32, 2 query/class"),
    "transformer": Config(TinyTransformer, _tokens, 4, 2, 0.1, 1, "cross_entropy"),
    "sine": Config(fastmeta.models.SineMLP, _sine, 25, 25, 0.01, 1, "mse"),
}
REFERENCES = ("reference", "hand-vmap", "higher-loop")
IMPLS = (*REFERENCES, "auto", "vmap", "loop", "higher")


def _loss(config: Config) -> Callable[..., torch.Tensor]:
    return F.cross_entropy if config.loss == "cross_entropy" else F.mse_loss


def _math_attention() -> Any:
    """The attention kernel that has a second derivative on every device."""
    return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)


def reference_step(model: nn.Module, task: fastmeta.TaskBatch, config: Config,
                   second_order: bool) -> None:
    """MAML written out: per task, inner steps by autograd, then backward."""
    loss = _loss(config)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # LoRA: adapters
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with _math_attention():
        for t in range(task.num_tasks):
            fast = dict(params)
            for _ in range(config.steps):
                inner = loss(functional_call(model, {**fast, **buffers},
                                             (task.support_x[t],)), task.support_y[t])
                grads = torch.autograd.grad(inner, list(fast.values()),
                                            create_graph=second_order)
                fast = {n: p - config.inner_lr * (g if second_order else g.detach())
                        for (n, p), g in zip(fast.items(), grads)}
            query = loss(functional_call(model, {**fast, **buffers}, (task.query_x[t],)),
                         task.query_y[t])
            (query / task.num_tasks).backward()


def hand_vmap_step(model: nn.Module, task: fastmeta.TaskBatch, config: Config,
                   second_order: bool) -> None:
    """The usual torch.func code: grad for the inner steps, vmap over the tasks, one
    backward. ``model`` has had its BatchNorms' running statistics removed
    (``torch.func.replace_all_batch_norm_modules_``), as torch.func's docs advise; torch's
    batching rules are trusted as they are (fastmeta's exact forms are not used)."""
    loss = _loss(config)
    params = dict(model.named_parameters())

    def one(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
            ) -> torch.Tensor:
        fast = params
        for _ in range(config.steps):
            grads = torch.func.grad(lambda f: loss(functional_call(model, f, (sx,)), sy))(fast)
            fast = {n: p - config.inner_lr * (grads[n] if second_order else grads[n].detach())
                    for n, p in fast.items()}
        return loss(functional_call(model, fast, (qx,)), qy)

    with _math_attention():
        torch.func.vmap(one)(*task).mean().backward()


def detached(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """higher's gradient callback of first-order MAML: the inner gradients as constants."""
    return [g.detach() for g in grads]


def higher_loop_step(model: nn.Module, task: fastmeta.TaskBatch, config: Config,
                     second_order: bool) -> None:
    """The usual higher code: innerloop_ctx with SGD per task, backward per task."""
    import higher

    loss = _loss(config)
    inner_optimizer = torch.optim.SGD(model.parameters(), lr=config.inner_lr)
    with _math_attention():
        for t in range(task.num_tasks):
            with higher.innerloop_ctx(model, inner_optimizer,
                                      copy_initial_weights=False) as (fmodel, diffopt):
                for _ in range(config.steps):
                    diffopt.step(loss(fmodel(task.support_x[t]), task.support_y[t]),
                                 grad_callback=None if second_order else detached)
                query = loss(fmodel(task.query_x[t]), task.query_y[t])
                (query / task.num_tasks).backward()


WRITTEN_HERE = {"reference": reference_step, "hand-vmap": hand_vmap_step,
                "higher-loop": higher_loop_step}


def build(impl: str, config: Config, device: str, second_order: bool = True,
          dtype: torch.dtype = torch.float32) -> Callable[[fastmeta.TaskBatch], None]:
    torch.manual_seed(0)
    model = config.model().to(device, dtype).train()
    if impl in WRITTEN_HERE:
        if impl == "hand-vmap":
            torch.func.replace_all_batch_norm_modules_(model)
        written = WRITTEN_HERE[impl]
        outer = torch.optim.SGD(model.parameters(), lr=0.0)

        def step(task: fastmeta.TaskBatch) -> None:
            # a whole meta-iteration, as fastmeta's rows run it: zero, meta-gradient, update
            outer.zero_grad(set_to_none=True)
            written(model, task, config, second_order)
            outer.step()

        step.grads = lambda: [p.grad for p in model.parameters()]  # type: ignore[attr-defined]
        return step
    learner = fastmeta.MAML(model, inner_lr=config.inner_lr, inner_steps=config.steps,
                            loss_fn=config.loss, engine=impl, first_order=not second_order)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)

    def meta_step(task: fastmeta.TaskBatch) -> None:
        learner.meta_step(task, optimizer)

    meta_step.grads = lambda: [p.grad for p in model.parameters()]  # type: ignore[attr-defined]
    meta_step.learner = learner  # type: ignore[attr-defined]
    return meta_step


def warm_up(step: Callable[[fastmeta.TaskBatch], None], task: fastmeta.TaskBatch) -> None:
    """One untimed meta-step; ``auto``: more, until its tuner has chosen (its first
    meta-steps time every exact candidate, the slower ones too)."""
    step(task)
    learner = getattr(step, "learner", None)
    for _ in range(MAX_TUNING_STEPS):
        if learner is None or not learner.engine_decision.tuning:
            return
        step(task)


def shuffled(rows: tuple[str, ...] | list[str], round_: int) -> list[str]:
    """``rows`` in an order drawn for round ``round_`` (the same in every run)."""
    return random.Random(round_).sample(list(rows), len(rows))


def progress(line: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(line, file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_config(name: str, tasks: int, rounds: int, device: str, second_order: bool = True,
                quick: bool = False) -> dict[str, Any]:
    config = CONFIGS[name]
    task = fastmeta.TaskBatch(*(t.to(device) for t in config.batch_for(tasks, quick)))
    steps = {impl: build(impl, config, device, second_order) for impl in IMPLS}
    for impl, step in steps.items():
        started = time.perf_counter()
        warm_up(step, task)
        progress(f"{name}: {impl} warmed up in {time.perf_counter() - started:.1f} s")
    # Every row against the plain loop run in float64 on the same model and batch: in
    # float32 the plain loop itself is off by up to 1e-2 where several inner steps pass
    # through BatchNorm, so rows are compared with the truth, not with each other.
    exact_step = build("reference", config, device, second_order, torch.float64)
    exact_step(fastmeta.TaskBatch(*(t.double() if t.is_floating_point() else t
                                    for t in task)))
    exact = [g.detach() for g in exact_step.grads()]  # type: ignore[attr-defined]
    # relative to the largest entry of the whole meta-gradient: a conv bias before a
    # BatchNorm has a true gradient of 0, and per tensor its rounding noise would count
    scale = max(max(float(r.abs().max()) for r in exact), 1e-12)
    errors = {}
    for impl, step in steps.items():
        grads = step.grads()  # type: ignore[attr-defined]
        errors[impl] = max(float((g.double() - r).abs().max()) for g, r in zip(grads, exact)
                           if g is not None) / scale
    threshold = max(DIFFERS * errors["reference"], DIFFERS_AT_LEAST)
    # short steps get more rounds (up to ~1 s of each row), so their medians are not noise
    _sync(device)
    start = time.perf_counter()
    steps["reference"](task)
    _sync(device)
    rounds = max(rounds, min(MAX_ROUNDS, int(1.0 / (time.perf_counter() - start))))
    samples: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        # a fresh order each round: a row run right after a long one (the higher loop)
        # is measurably slower, and a rotation would give every row the same predecessor
        order = shuffled(IMPLS, r)
        for impl in order:
            _sync(device)
            start = time.perf_counter()
            steps[impl](task)
            _sync(device)
            samples[impl].append(time.perf_counter() - start)
        if rounds <= 20 or (r + 1) % 20 == 0:
            progress(f"{name}: round {r + 1} of {rounds}")
    auto = steps["auto"].learner  # type: ignore[attr-defined]
    return {
        "samples": samples,
        "median_s": {i: statistics.median(s) for i, s in samples.items()},
        "vs_reference": {i: statistics.median(a / b for a, b in zip(samples["reference"], s))
                         for i, s in samples.items()},
        "grad_error": errors,
        "differs_above": threshold,
        "rounds": rounds,
        "auto_engine": auto.engine,
        "auto_timings": auto.engine_decision.timings,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# Freed blocks above 64 KiB go back to the OS at once, so that the high-water mark follows
# the tensors alive together rather than glibc's heap (whose threshold otherwise grows).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_child(name: str, impl: str, tasks: int, device: str, second_order: bool,
                 quick: bool = False) -> dict[str, float]:
    """MiB above the baseline: ``"run"``, the peak over the whole run from the first
    meta-step (``auto``'s check and tuning steps included); ``"settled"``, the peak of one
    meta-step after the warm-up."""
    torch.set_num_threads(1)
    config = CONFIGS[name]
    task = fastmeta.TaskBatch(*(t.to(device) for t in config.batch_for(tasks, quick)))
    step = build(impl, config, device, second_order)
    peaks = {}
    for phase in ("run", "settled"):
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")
            base = _status_kib("VmRSS") * 1024
        if phase == "run":
            warm_up(step, task)
        else:
            step(task)
        if device.startswith("cuda"):
            peaks[phase] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            peaks[phase] = (_status_kib("VmHWM") * 1024 - base) / 2**20
    return peaks


def peak_memory(name: str, impl: str, tasks: int, args: argparse.Namespace,
                second_order: bool) -> dict[str, float]:
    """:func:`memory_child` of one row, run in a fresh process."""
    progress(f"{name}: peak memory of {impl} (a fresh process)")
    done = subprocess.run(
        [sys.executable, __file__, "--device", args.device, "--memory-child", name, impl,
         str(tasks), "2" if second_order else "1", "quick" if args.quick else "full"],
        capture_output=True, text=True, check=True, env=CHILD_ENV)
    return dict(json.loads(done.stdout.splitlines()[-1]))


# --overhead: fastmeta's fixed costs against hand-written torch.func code on the sine MLP,
# where a meta-step is mostly fixed cost (the arithmetic is about 17 MFLOP).
OVERHEAD_ROWS = ("hand-vmap", "default", "hand-vmap compiled", "compile=True",
                 "hand-grad compiled")


def overhead_rows(steps: int, device: str) -> dict[str, Callable[[fastmeta.TaskBatch], None]]:
    """The rows of ``--overhead`` at ``steps`` inner steps: each a whole meta-iteration
    with an outer Adam step (learning rate 0, so every round sees the same model).

    ``hand-vmap``: :func:`hand_vmap_step`; ``default``: ``fastmeta.MAML`` as constructed by
    default; ``hand-vmap compiled``: the same hand-written meta-loss (``grad`` in ``vmap``,
    then the mean) under ``torch.compile``, the backward and Adam outside; ``compile=True``:
    ``fastmeta.MAML(compile=True)``; ``hand-grad compiled``: the hand-written meta-loss's
    gradient taken by ``torch.func.grad`` inside the compiled function, as
    ``compile=True`` does, Adam outside.
    """
    config = CONFIGS["sine"]
    config = Config(config.model, config.batch, 25, 25, config.inner_lr, steps, "mse")
    loss = _loss(config)
    rows: dict[str, Callable[[fastmeta.TaskBatch], None]] = {}

    def hand(compiled: bool, in_graph: bool = False) -> Callable[[fastmeta.TaskBatch], None]:
        torch.manual_seed(0)
        model = config.model().to(device)
        params = dict(model.named_parameters())

        def one(initial: dict[str, torch.Tensor], sx: torch.Tensor, sy: torch.Tensor,
                qx: torch.Tensor, qy: torch.Tensor) -> torch.Tensor:
            fast = initial
            for _ in range(steps):
                grads = torch.func.grad(
                    lambda f: loss(functional_call(model, f, (sx,)), sy))(fast)
                fast = {n: p - config.inner_lr * grads[n] for n, p in fast.items()}
            return loss(functional_call(model, fast, (qx,)), qy)

        def meta_loss_of(initial: dict[str, torch.Tensor], *task: torch.Tensor
                         ) -> torch.Tensor:
            return torch.func.vmap(partial(one, initial))(*task).mean()

        def meta_loss(*task: torch.Tensor) -> torch.Tensor:
            return meta_loss_of(params, *task)

        optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
        if in_graph:
            gradient = torch.compile(torch.func.grad(meta_loss_of))

            def step(task: fastmeta.TaskBatch) -> None:
                optimizer.zero_grad(set_to_none=True)
                with torch.no_grad():
                    grads = gradient(params, *task)
                for name, p in params.items():
                    p.grad = grads[name]
                optimizer.step()
        else:
            run = torch.compile(meta_loss) if compiled else meta_loss

            def step(task: fastmeta.TaskBatch) -> None:
                optimizer.zero_grad(set_to_none=True)
                run(*task).backward()
                optimizer.step()

        step.grads = lambda: [p.grad for p in model.parameters()]  # type: ignore[attr-defined]
        return step

    def ours(compiled: bool) -> Callable[[fastmeta.TaskBatch], None]:
        torch.manual_seed(0)
        learner = fastmeta.MAML(config.model().to(device), inner_lr=config.inner_lr,
                                inner_steps=steps, loss_fn="mse", compile=compiled)
        optimizer = torch.optim.Adam(learner.parameters(), lr=0.0)

        def step(task: fastmeta.TaskBatch) -> None:
            learner.meta_step(task, optimizer)

        step.learner = learner  # type: ignore[attr-defined]
        step.grads = lambda: [p.grad for p in learner.module.parameters()]  # type: ignore
        return step

    rows["hand-vmap"], rows["default"] = hand(False), ours(False)
    rows["hand-vmap compiled"], rows["compile=True"] = hand(True), ours(True)
    rows["hand-grad compiled"] = hand(True, in_graph=True)
    return rows


def overhead(steps: int, rounds: int, device: str) -> dict[str, Any]:
    """Times the :func:`overhead_rows` side by side: each round runs every row once, in
    an order drawn afresh; ratios are medians over rounds of the per-round ratio."""
    task = fastmeta.TaskBatch(*(t.to(device) for t in CONFIGS["sine"].batch(25)))
    rows = overhead_rows(steps, device)
    for name, step in rows.items():
        started = time.perf_counter()
        warm_up(step, task)
        for _ in range(3):  # compiled rows: the first calls after compiling are slower
            step(task)
        progress(f"overhead, {steps} step(s): {name} warmed up in "
                 f"{time.perf_counter() - started:.1f} s")
    reference = [g.detach().clone() for g in rows["hand-vmap"].grads()]  # type: ignore
    errors = {}
    for name, step in rows.items():
        grads = step.grads()  # type: ignore[attr-defined]
        errors[name] = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-12))
                           for g, r in zip(grads, reference))
    samples: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(rounds):
        for name in shuffled(list(rows), r):
            _sync(device)
            start = time.perf_counter()
            rows[name](task)
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    def ratio(faster: str, than: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[than], samples[faster]))

    return {
        "steps": steps, "rounds": rounds, "grad_error": errors,
        "median_ms": {n: 1e3 * statistics.median(v) for n, v in samples.items()},
        "p20_ms": {n: 1e3 * sorted(v)[len(v) // 5] for n, v in samples.items()},
        "default_vs_hand": ratio("default", "hand-vmap"),
        "compiled_vs_hand": ratio("compile=True", "hand-vmap compiled"),
        "compiled_vs_hand_grad": ratio("compile=True", "hand-grad compiled"),
        "samples": samples,
    }


def print_overhead(results: list[dict[str, Any]]) -> None:
    print("sine MLP, 25 tasks, second-order MAML, outer Adam; ms per meta-step: median "
          "(20th percentile); ratio: median over rounds of hand-written time / fastmeta's "
          "(>= 1: fastmeta at least as fast)\n")
    print("| inner steps | " + " | ".join(OVERHEAD_ROWS) + " | default vs hand-vmap "
          "| compile=True vs hand-vmap compiled | compile=True vs hand-grad compiled |")
    print("|---" * (len(OVERHEAD_ROWS) + 4) + "|")
    for result in results:
        cells = [f"{result['median_ms'][n]:.2f} ({result['p20_ms'][n]:.2f})"
                 for n in OVERHEAD_ROWS]
        print(f"| {result['steps']} | {' | '.join(cells)} | {result['default_vs_hand']:.2f}× "
              f"| {result['compiled_vs_hand']:.2f}× | {result['compiled_vs_hand_grad']:.2f}× |")
    print()
    for result in results:
        for key, label in (("default_vs_hand", "eager default vs the hand-written vmap loop"),
                           ("compiled_vs_hand", "compile=True vs the compiled hand-written "
                                                "meta-loss")):
            verdict = "PASS" if result[key] >= 1.0 else "MISS"
            print(f"- {verdict}: {result['steps']} step(s): {label}: {result[key]:.3f}× "
                  f"(target >= 1.0×)")
        worst = max(result["grad_error"].values())
        print(f"- {result['steps']} step(s): every row's meta-gradient within "
              f"{worst:.1e} (relative, float32) of the hand-written loop's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller meta-batches (omniglot 4, miniimagenet 1, transformer 2 "
                             "tasks; resnet12 one task at 3x32x32, 2 query/class), 2 rounds, "
                             "memory of the reference loop and auto only")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds at least (3; --quick 2); a configuration whose step "
                             "is short gets more, up to about 1 s of each row and 200 rounds")
    parser.add_argument("--first-order", action="store_true",
                        help="first-order MAML in every row (default: second order)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-jobs", type=int, default=None,
                        help="fresh processes measuring peak memory at once, after all the "
                             "timing (default: 2 on a CPU with 2 cores or more, 1 on CUDA)")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--overhead", action="store_true",
                        help="only the fixed-cost check on the sine MLP at 1 and 5 inner "
                             "steps: the default and compile=True against hand-written "
                             "torch.func code, eager and compiled (compiling takes minutes)")
    parser.add_argument("--overhead-rounds", type=int, default=300,
                        help="rounds of --overhead (default 300)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.overhead:
        found = [overhead(steps, args.overhead_rounds, args.device) for steps in (1, 5)]
        print_overhead(found)
        if args.json:
            with open(args.json, "w") as out:
                json.dump(found, out, indent=1)
        return
    if args.memory_child:
        name, impl, tasks, order, quick = args.memory_child
        print(json.dumps(memory_child(name, impl, int(tasks), args.device, order == "2",
                                      quick == "quick")))
        return
    second_order = not args.first_order
    rounds = args.rounds or (2 if args.quick else 3)
    memory_rows = ("reference", "auto") if args.quick else IMPLS
    results: dict[str, Any] = {}
    for name in args.only:
        config = CONFIGS[name]
        tasks = config.quick_tasks if args.quick else config.tasks
        results[name] = time_config(name, tasks, rounds, args.device, second_order, args.quick)
        results[name]["tasks"], results[name]["peak_mib"] = tasks, {}
        results[name]["run_peak_mib"] = {}
        timed = results[name]["vs_reference"]
        progress(f"{name}: timed; auto {timed['auto']:.2f}× the plain loop, hand-written vmap "
                 f"{timed['hand-vmap']:.2f}×, plain higher loop {timed['higher-loop']:.2f}× "
                 f"(auto runs {results[name]['auto_engine']})")
    if not args.no_memory and (args.device.startswith("cuda") or sys.platform == "linux"):
        # auto's rows first (its check and tuning make them the longest), so that the
        # processes running at once finish together
        jobs = sorted(((name, impl) for name in args.only for impl in memory_rows),
                      key=lambda job: job[1] != "auto")
        workers = args.memory_jobs or (1 if args.device.startswith("cuda")
                                       else min(2, os.cpu_count() or 1))
        progress(f"peak memory of {len(jobs)} rows, each in a fresh process, {workers} at once "
                 f"(the timing is done: they measure memory, not time)")
        with ThreadPoolExecutor(workers) as pool:
            peaks = pool.map(lambda job: peak_memory(job[0], job[1], results[job[0]]["tasks"],
                                                     args, second_order), jobs)
            for (name, impl), peak in zip(jobs, peaks):
                results[name]["peak_mib"][impl] = peak["settled"]
                results[name]["run_peak_mib"][impl] = peak["run"]
    order = "second" if second_order else "first"
    print(f"{order}-order MAML; median ms per meta-step · median ratio to the plain per-task "
          f"loop (> 1: faster); peak MiB per row in fresh processes: of a settled meta-step, "
          f"and for auto of the whole run (check and tuning steps included)\n")
    print("| configuration | " + " | ".join(IMPLS) + " | auto runs |")
    print("|---" * (len(IMPLS) + 2) + "|")
    for name, result in results.items():
        config, tasks, memory = CONFIGS[name], result["tasks"], result["peak_mib"]

        def cell(i: str, result: dict[str, Any] = result, memory: dict[str, float] = memory
                 ) -> str:
            text = f"{result['median_s'][i] * 1e3:.0f} ms · {result['vs_reference'][i]:.2f}×"
            if i in memory:
                text += f" · {memory[i]:.0f} MiB"
            if i == "auto" and i in result["run_peak_mib"]:
                text += f" (run: {result['run_peak_mib'][i]:.0f} MiB)"
            if result["grad_error"][i] > result["differs_above"]:
                text += f" (differs: {result['grad_error'][i]:.1e})"
            return text

        label = f"{name} ({tasks} tasks"
        label += f", {config.quick_shape})" if args.quick and config.quick_shape else ")"
        print(f"| {label} | {' | '.join(cell(i) for i in IMPLS)} | "
              f"{result['auto_engine']} |", flush=True)
    print()
    for name, result in results.items():
        exact = [i for i in REFERENCES if result["grad_error"][i] <= result["differs_above"]]
        speed = result["vs_reference"]["auto"]
        fastest = max(result["vs_reference"][i] for i in exact)
        best = max(exact, key=lambda i: result["vs_reference"][i])
        verdict = "PASS" if speed >= TARGET_SPEED * fastest else "MISS"
        print(f"- {verdict}: {name}: auto {speed / fastest:.2f}× the fastest exact reference "
              f"({best}; target >= {TARGET_SPEED}×)")
        if name == "sine":
            hand = result["vs_reference"]["hand-vmap"]
            verdict = "PASS" if speed >= hand else "MISS"
            print(f"- {verdict}: sine: auto {speed / hand:.2f}× the hand-written vmap loop "
                  f"(target >= 1.0×)")
        peak, run = result["peak_mib"], result["run_peak_mib"]
        if peak:
            ratio = peak["auto"] / max(peak["reference"], 1.0)
            verdict = "PASS" if ratio <= TARGET_MEMORY else "MISS"
            print(f"- {verdict}: {name}: auto peak memory {peak['auto']:.0f} MiB, {ratio:.2f}× "
                  f"the per-task loop's {peak['reference']:.0f} MiB (target <= "
                  f"{TARGET_MEMORY}×; below 1 MiB counts as 1)")
            # no target: auto may try any engine whose predicted peak fits its budget
            print(f"- {name}: peak over the whole run from the first meta-step (auto's check "
                  f"and tuning included): auto {run['auto']:.0f} MiB, the per-task loop "
                  f"{run['reference']:.0f} MiB")
        inexact = {i: e for i, e in result["grad_error"].items()
                   if e > result["differs_above"]}
        if inexact:
            print(f"- meta-gradients that differ from the per-task loop's: {name}: {inexact}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()

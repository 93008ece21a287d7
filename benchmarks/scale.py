"""fastmeta's engines against a plain per-task loop, at the scales users run, side by side.

Usage:
    python benchmarks/scale.py                 # every configuration, 3 rounds, memory
    python benchmarks/scale.py --quick         # smaller meta-batches
    python benchmarks/scale.py --only omniglot --device cuda

Configurations (second-order MAML unless said; float32; one thread on CPU):

- ``omniglot``: Conv-4 with 64 channels, 1×28×28, 5-way 1-shot, 5 query per class,
  meta-batch 32, 1 inner step, α = 0.4 (the MAML paper's Omniglot protocol);
- ``miniimagenet``: Conv-4 with 32 channels, 3×84×84, 5-way 1-shot, 15 query per class,
  meta-batch 4, 5 inner steps, α = 0.01 (its miniImageNet protocol);
- ``resnet12``: ResNet-12 at the miniImageNet shape, 5-way 1-shot, meta-batch 4, 1 step;
- ``transformer``: an embedding, a Transformer encoder layer (d = 32) and a linear head on
  16 tokens, 5-way 5-shot, meta-batch 4, 1 step;
- ``sine``: the MAML paper's 1-40-40-1 MLP, K = 10, meta-batch 25, 1 step.

Rows: the reference written here (``functional_call`` + ``torch.autograd.grad`` per task,
``backward`` per task), and fastmeta's ``auto`` (after its check and its tuning steps),
``vmap``, ``loop`` and ``higher`` engines. Each round times every row once, in rotating
order, on the same batch; the table shows the median time and the median over rounds of
the ratio to the reference (> 1: faster). Before timing, every row's meta-gradient is
compared with the reference's. Peak memory: the resident-set high-water mark of one
meta-step in a fresh process (on CUDA, ``torch.cuda.max_memory_allocated``), for the
reference and ``auto``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmeta

TARGET_SPEED, TARGET_MEMORY = 0.95, 1.5


@dataclass(frozen=True)
class Config:
    model: Callable[[], nn.Module]
    batch: Callable[[int], fastmeta.TaskBatch]
    tasks: int
    quick_tasks: int
    inner_lr: float
    steps: int
    loss: str


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
                       _images(3, 84, 5, 1, 15), 4, 1, 0.01, 1, "cross_entropy"),
    "transformer": Config(TinyTransformer, _tokens, 4, 2, 0.1, 1, "cross_entropy"),
    "sine": Config(fastmeta.models.SineMLP, _sine, 25, 25, 0.01, 1, "mse"),
}
IMPLS = ("reference", "auto", "vmap", "loop", "higher")


def reference_step(model: nn.Module, task: fastmeta.TaskBatch, config: Config) -> None:
    """Second-order MAML written out: per task, inner steps by autograd, then backward."""
    loss = F.cross_entropy if config.loss == "cross_entropy" else F.mse_loss
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # 2nd order
        _reference_tasks(model, task, config, loss)


def _reference_tasks(model: nn.Module, task: fastmeta.TaskBatch, config: Config,
                     loss: Callable[..., torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for t in range(task.num_tasks):
        fast = dict(params)
        for _ in range(config.steps):
            inner = loss(functional_call(model, {**fast, **buffers}, (task.support_x[t],)),
                         task.support_y[t])
            grads = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
            fast = {n: p - config.inner_lr * g for (n, p), g in zip(fast.items(), grads)}
        query = loss(functional_call(model, {**fast, **buffers}, (task.query_x[t],)),
                     task.query_y[t])
        (query / task.num_tasks).backward()


def build(impl: str, config: Config, device: str) -> Callable[[fastmeta.TaskBatch], None]:
    torch.manual_seed(0)
    model = config.model().to(device).train()
    if impl == "reference":
        def step(task: fastmeta.TaskBatch) -> None:
            model.zero_grad(set_to_none=True)
            reference_step(model, task, config)

        step.grads = lambda: [p.grad for p in model.parameters()]  # type: ignore[attr-defined]
        return step
    learner = fastmeta.MAML(model, inner_lr=config.inner_lr, inner_steps=config.steps,
                            loss_fn=config.loss, engine=impl)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)

    def meta_step(task: fastmeta.TaskBatch) -> None:
        learner.meta_step(task, optimizer)

    meta_step.grads = lambda: [p.grad for p in model.parameters()]  # type: ignore[attr-defined]
    meta_step.learner = learner  # type: ignore[attr-defined]
    return meta_step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_config(name: str, tasks: int, rounds: int, device: str) -> dict[str, Any]:
    config = CONFIGS[name]
    task = fastmeta.TaskBatch(*(t.to(device) for t in config.batch(tasks)))
    steps = {impl: build(impl, config, device) for impl in IMPLS}
    for impl, step in steps.items():  # warm-up; auto: its check and its tuning steps
        warm = 8 if impl == "auto" else 1
        for _ in range(warm):
            step(task)
    reference = [g.detach().clone() for g in steps["reference"].grads()]  # type: ignore[attr-defined]
    errors = {}
    for impl, step in steps.items():
        grads = step.grads()  # type: ignore[attr-defined]
        errors[impl] = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-12))
                           for g, r in zip(grads, reference) if g is not None)
    samples: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        order = list(IMPLS[r % len(IMPLS):] + IMPLS[:r % len(IMPLS)])
        for impl in order:
            _sync(device)
            start = time.perf_counter()
            steps[impl](task)
            _sync(device)
            samples[impl].append(time.perf_counter() - start)
    auto = steps["auto"].learner  # type: ignore[attr-defined]
    return {
        "samples": samples,
        "median_s": {i: statistics.median(s) for i, s in samples.items()},
        "vs_reference": {i: statistics.median(a / b for a, b in zip(samples["reference"], s))
                         for i, s in samples.items()},
        "grad_error": errors,
        "auto_engine": auto.engine,
        "auto_timings": auto.engine_decision.timings,
    }


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(name: str, impl: str, tasks: int, device: str) -> float:
    """MiB above the baseline during one meta-step of ``impl`` (after its warm-up)."""
    torch.set_num_threads(1)
    config = CONFIGS[name]
    task = fastmeta.TaskBatch(*(t.to(device) for t in config.batch(tasks)))
    step = build(impl, config, device)
    for _ in range(8):  # the same warm-up for every row (auto: its check and its tuning)
        step(task)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(task)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    base = _status_kib("VmRSS")
    step(task)
    return (_status_kib("VmHWM") - base) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller meta-batches (omniglot 4, miniimagenet 1, resnet12 1, "
                             "transformer 2 tasks), 2 rounds")
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (3; --quick 2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        name, impl, tasks = args.memory_child
        print(json.dumps(memory_child(name, impl, int(tasks), args.device)))
        return
    rounds = args.rounds or (2 if args.quick else 3)
    results: dict[str, Any] = {}
    print("| configuration | " + " | ".join(IMPLS) + " | auto runs | peak MiB: reference / auto |")
    print("|---" * (len(IMPLS) + 3) + "|")
    for name in args.only:
        config = CONFIGS[name]
        tasks = config.quick_tasks if args.quick else config.tasks
        result = time_config(name, tasks, rounds, args.device)
        memory = {}
        if not args.no_memory and (args.device.startswith("cuda") or sys.platform == "linux"):
            for impl in ("reference", "auto"):
                done = subprocess.run(
                    [sys.executable, __file__, "--device", args.device, "--memory-child",
                     name, impl, str(tasks)], capture_output=True, text=True, check=True)
                memory[impl] = json.loads(done.stdout.splitlines()[-1])
        result["peak_mib"], result["tasks"] = memory, tasks
        results[name] = result
        cells = " | ".join(
            f"{result['median_s'][i] * 1e3:.0f} ms · {result['vs_reference'][i]:.2f}×"
            for i in IMPLS)
        mem = (f"{memory['reference']:.0f} / {memory['auto']:.0f}" if memory else "-")
        print(f"| {name} ({tasks} tasks) | {cells} | {result['auto_engine']} | {mem} |",
              flush=True)
    print()
    for name, result in results.items():
        bad = {i: e for i, e in result["grad_error"].items() if e > 1e-4}
        speed = result["vs_reference"]["auto"]
        fastest = max(result["vs_reference"].values())
        verdict = "PASS" if speed >= TARGET_SPEED * min(1.0, fastest) else "MISS"
        print(f"- {verdict}: {name}: auto {speed:.2f}× the reference loop "
              f"(fastest row {fastest:.2f}×; target >= {TARGET_SPEED}× the fastest reference)")
        if result["peak_mib"]:
            ratio = result["peak_mib"]["auto"] / max(result["peak_mib"]["reference"], 1e-9)
            verdict = "PASS" if ratio <= TARGET_MEMORY else "MISS"
            print(f"- {verdict}: {name}: auto peak memory {ratio:.2f}× the reference loop's "
                  f"(target <= {TARGET_MEMORY}×)")
        if bad:
            print(f"- MISMATCH: {name}: meta-gradients differ from the reference: {bad}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()

"""Data-parallel scaling of sine MAML: meta-iterations per second on 1 and 2 processes.

Usage:
    python benchmarks/scaling.py --quick               # about a minute: 1 round, few repeats
    python benchmarks/scaling.py                       # 3 rounds (a few minutes)
    python benchmarks/scaling.py --meta-batch 50 --inner-steps 1 5 --json scaling.json
    python benchmarks/scaling.py --nproc 4             # on a machine with 4 cores or more

The workload is the sine benchmark of the MAML paper with a fixed total meta-batch
(default 25 tasks, K=10 support and 10 query points, MLP 1-40-40-1, inner SGD 0.01,
Adam 1e-3, second order, ``engine="auto"``), at 1 and 5 inner steps. Three
configurations run it, each in fresh processes:

- ``1 process x 1 thread``: a plain learner, no process group (``torch.set_num_threads(1)``);
- ``1 process x N threads``: the same with N intra-op threads (N = ``--nproc``);
- ``N processes x 1 thread``: ``torchrun --standalone --nproc_per_node=N``, gloo,
  ``fastmeta.distributed.data_parallel``; every rank draws the full meta-batch and
  trains on its ``shard`` (13 + 12 tasks for 25 on 2 processes).

N processes on N cores must each use 1 thread (torchrun sets ``OMP_NUM_THREADS=1``; the
script also calls ``torch.set_num_threads(1)``), and the fair baseline is one process
with all N cores, hence the second configuration.

Method: each configuration takes ``--warmup`` meta-steps, then ``--repeats`` timed
blocks of ``--steps`` meta-steps (ranks meet at a barrier before each block; the steps
themselves keep them in lockstep); its rate is the median over blocks. A round runs
the three configurations one after the other (order rotated per round); the speed-ups
are medians over rounds of the ratios within a round. The N-process run also reports
what is communicated per meta-step (bytes of the flattened meta-gradient plus the loss
slots, and the 8-byte-per-rank status), the median time of one ``all_reduce`` of that
many bytes, and the time of one meta-step of a plain learner on one rank's share (the
compute a rank does), so that the cost of communication can be compared with the
inner loops. No wall time is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fastmeta
import fastmeta.distributed as fmd
from fastmeta.data import BatchMetaDataLoader, sinusoid

ROOT = Path(__file__).resolve().parents[1]
INNER_LR = 0.01
OUTER_LR = 1e-3
SHOTS = 10


# ---------------------------------------------------------------------------- child process


def timed_rate(step: Any, steps: int, repeats: int) -> list[float]:
    """Meta-iterations per second of ``repeats`` blocks of ``steps`` calls of ``step(i)``."""
    rates = []
    for _ in range(repeats):
        if fmd.is_distributed():
            dist.barrier()
        start = time.perf_counter()
        for i in range(steps):
            step(i)
        rates.append(steps / (time.perf_counter() - start))
    return rates


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration: time every case; returns its numbers (written by rank 0)."""
    torch.set_num_threads(args.threads)
    fmd.init_from_env()
    results: dict[str, Any] = {
        "world_size": fmd.world_size(),
        "threads": torch.get_num_threads(),
        "cases": {},
    }
    loader = BatchMetaDataLoader(
        sinusoid(SHOTS, test_shots=SHOTS, preset="maml", seed=0), batch_size=args.meta_batch
    )
    pool = [b for _, b in zip(range(args.steps), loader)]  # the same batches on every rank
    for inner_steps in args.inner_steps:
        torch.manual_seed(0)
        learner = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=INNER_LR,
                                inner_steps=inner_steps)
        if fmd.is_distributed():
            fmd.data_parallel(learner)
        optimizer = torch.optim.Adam(learner.parameters(), lr=OUTER_LR)

        def step(i: int, learner: fastmeta.MetaLearner = learner,
                 optimizer: torch.optim.Optimizer = optimizer) -> None:
            learner.meta_step(fmd.shard(pool[i % len(pool)]), optimizer)

        for i in range(args.warmup):
            step(i)
        rates = timed_rate(step, args.steps, args.repeats)
        case: dict[str, Any] = {"rates": rates, "median_its": statistics.median(rates),
                                "engine": learner.engine}
        if fmd.is_distributed():
            case.update(communication(learner, args, inner_steps, pool))
        results["cases"][str(inner_steps)] = case
    if fmd.is_main_process() and args.out is not None:  # only rank 0 writes
        args.out.write_text(json.dumps(results))
    if fmd.is_distributed():
        dist.destroy_process_group()
    return results


def communication(
    learner: fastmeta.MetaLearner, args: argparse.Namespace, inner_steps: int, pool: list[Any]
) -> dict[str, Any]:
    """Bytes sent per meta-step, the time of one all_reduce of them, one rank's compute."""
    world = fmd.world_size()
    share = -(-args.meta_batch // world)
    params = [p for p in learner.parameters() if p.requires_grad]
    floats = sum(p.numel() for p in params) + len(params) + world * share * (1 + inner_steps)
    buffer = torch.zeros(floats)
    for _ in range(20):
        dist.all_reduce(buffer)
    samples = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(100):
            dist.all_reduce(buffer)
        samples.append((time.perf_counter() - start) / 100)
    # What one rank computes per meta-step: a plain learner on its share, no collectives.
    torch.manual_seed(0)
    plain = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=INNER_LR, inner_steps=inner_steps)
    optimizer = torch.optim.Adam(plain.parameters(), lr=OUTER_LR)
    for i in range(args.warmup):
        plain.meta_step(fmd.shard(pool[i % len(pool)]), optimizer)
    dist.barrier()
    compute = timed_rate(
        lambda i: plain.meta_step(fmd.shard(pool[i % len(pool)]), optimizer),
        args.steps,
        args.repeats,
    )
    return {
        "gradient_bytes": sum(p.numel() * p.element_size() for p in params),
        "buffer_bytes": floats * buffer.element_size(),
        "status_bytes": 8 * world,
        "all_reduce_ms": 1e3 * statistics.median(samples),
        "compute_ms": 1e3 / statistics.median(compute),
    }


# ---------------------------------------------------------------------------- parent


def run_config(label: str, nproc: int, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Launch one configuration in fresh processes and return rank 0's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        forwarded = [
            "--child", "--out", str(out), "--threads", str(threads),
            "--meta-batch", str(args.meta_batch), "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--inner-steps", *map(str, args.inner_steps),
        ]  # fmt: skip
        script = str(Path(__file__).resolve())
        if nproc == 1:
            command = [sys.executable, script, *forwarded]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc_per_node={nproc}", script, *forwarded]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{label} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def configs(nproc: int) -> list[tuple[str, int, int]]:
    """(label, processes, threads per process) of the three configurations."""
    return [
        ("1 process x 1 thread", 1, 1),
        (f"1 process x {nproc} threads", 1, nproc),
        (f"{nproc} processes x 1 thread", nproc, 1),
    ]


def format_report(rounds: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown: rates, speed-ups, and what one data-parallel step communicates."""
    labels = [label for label, _, _ in configs(args.nproc)]
    base, threaded, parallel = labels
    lines = [
        f"## Data-parallel scaling: sine MAML, meta-batch {args.meta_batch} in total, "
        f"torch {torch.__version__}, {os.cpu_count()} CPU cores, {len(rounds)} round(s)",
        "",
        "Meta-iterations per second (median over rounds of the median over "
        f"{args.repeats} blocks of {args.steps} steps); speed-ups are medians of per-round "
        "ratios (> 1: the processes are faster).",
        "",
        "| inner steps | " + " | ".join(labels) + f" | {parallel} vs {base} | "
        f"{parallel} vs {threaded} |",
        "|---|" + "---|" * (len(labels) + 2),
    ]
    for k in map(str, args.inner_steps):
        rates = {lb: statistics.median(r[lb]["cases"][k]["median_its"] for r in rounds)
                 for lb in labels}  # fmt: skip
        ratios = [
            statistics.median(r[parallel]["cases"][k]["median_its"]
                              / r[other]["cases"][k]["median_its"] for r in rounds)
            for other in (base, threaded)
        ]  # fmt: skip
        lines.append(
            f"| {k} | " + " | ".join(f"{rates[lb]:.1f}" for lb in labels)
            + f" | {ratios[0]:.2f}x | {ratios[1]:.2f}x |"
        )
    lines += ["", f"## What one meta-step communicates ({parallel}, gloo)", ""]
    lines += ["| inner steps | meta-gradient bytes | all_reduce buffer bytes | status bytes | "
              "one all_reduce of the buffer, ms | one rank's compute per step, ms |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for k in map(str, args.inner_steps):
        cases = [r[parallel]["cases"][k] for r in rounds]
        lines.append(
            f"| {k} | {cases[0]['gradient_bytes']} | {cases[0]['buffer_bytes']} | "
            f"{cases[0]['status_bytes']} | "
            f"{statistics.median(c['all_reduce_ms'] for c in cases):.3f} | "
            f"{statistics.median(c['compute_ms'] for c in cases):.2f} |"
        )
    engines = {r[lb]["cases"][k]["engine"] for r in rounds for lb in labels
               for k in map(str, args.inner_steps)}  # fmt: skip
    lines += ["", f"Engine: {', '.join(sorted(engines))}."]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 3 repeats of 10 steps")
    parser.add_argument("--rounds", type=int, default=None, help="default 3, --quick 1")
    parser.add_argument("--repeats", type=int, default=None, help="default 7, --quick 3")
    parser.add_argument("--steps", type=int, default=None, help="meta-steps per timed block "
                        "(default 20, --quick 10)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=3, help="untimed meta-steps (default 3)")
    parser.add_argument("--meta-batch", type=int, default=25, help="total tasks per meta-step")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--nproc", type=int, default=2, help="processes (and threads) compared")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="write every number to PATH")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = (1, 3, 10) if args.quick else (3, 7, 20)
    for name, default in zip(("rounds", "repeats", "steps"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("rounds", "repeats", "steps", "meta_batch", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.meta_batch < args.nproc:
        parser.error(
            f"--meta-batch {args.meta_batch} is smaller than --nproc {args.nproc}: every "
            f"process needs at least one task"
        )
    if any(k < 1 for k in args.inner_steps):
        parser.error(f"--inner-steps must all be >= 1, got {args.inner_steps}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every configuration ``--rounds`` times, print the report, return every number."""
    args = parse_args(argv)
    if args.child:
        return child(args)
    rounds = []
    order = configs(args.nproc)
    for index in range(args.rounds):
        rotated = order[index % len(order):] + order[: index % len(order)]
        rounds.append({label: run_config(label, n, t, args) for label, n, t in rotated})
    report = format_report(rounds, args)
    print(report)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
              "report": report}  # fmt: skip
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

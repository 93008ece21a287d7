"""Which draw decides a sine cell: the training seed or the held-out tasks?

Usage:
    python benchmarks/sine_seed_swap.py runs/sine-seeds            # maml, K = 5
    python benchmarks/sine_seed_swap.py runs/sine-seeds --algorithm fomaml --shots 10

Takes the per-seed checkpoints of a ``fastmeta bench sine --seeds N`` run and evaluates
every seed's trained model on every seed's held-out tasks (the benchmark's own
evaluation, only the seed of the task draw changed). A row that stays bad on every task
draw is the training seed's doing; a column bad for every model is the draw's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fastmeta.bench._protocol import benchmark as find_benchmark
from fastmeta.bench._registry import load_learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the --out of a bench sine --seeds run")
    parser.add_argument("--algorithm", default="maml")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
    args = parser.parse_args()
    torch.set_num_threads(1)
    bench = find_benchmark("sine")
    paths = sorted((args.out / "checkpoints").glob(f"{args.algorithm}-seed*.pt"))
    seeds = [int(p.stem.rsplit("seed", 1)[1]) for p in paths]
    print(f"{args.algorithm}, K = {args.shots}: query MSE mean (median; diverged) after "
          f"{', '.join(map(str, args.steps))} steps")
    print("| trained with seed | " + " | ".join(f"tasks of seed {s}" for s in seeds) + " |")
    print("|---" * (len(seeds) + 1) + "|")
    for path, trained in zip(paths, seeds):
        learner, payload = load_learner(path)
        settings = dict(payload["metadata"]["config"])
        cells = []
        for drawn in seeds:
            config = bench.config.from_dict({**settings, "seed": drawn, "seeds": 1,
                                             "algorithms": [args.algorithm],
                                             "eval_shots": [args.shots],
                                             "eval_steps": max(args.steps)})
            curve = bench.evaluate(learner, args.algorithm, config)["curves"][str(args.shots)]
            parts = []
            for step in args.steps:
                s = curve["summaries"][step]
                mean = "nan" if s["mean"] is None else f"{s['mean']:.3g}"
                parts.append(f"{mean} ({s['median']:.3f}; {s['diverged']})")
            cells.append(" / ".join(parts))
        print(f"| {trained} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

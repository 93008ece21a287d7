"""Meta-train MAML, first-order MAML or Reptile on sine waves; adapt from 10 points.

The MAML paper's regression setup (Finn et al. 2017, §5.1): tasks y = A·sin(x − φ) with
A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[-5, 5]; MLP 1-40-40-1; K = 10 support and 10 query
points; one inner SGD step with α = 0.01; meta-batch 25; Adam 1e-3. The paper trains
70,000 iterations; this example trains a few thousand, enough to see adaptation work.

Usage:
    python examples/sine_maml.py                 # 5,000 meta-iterations (about a minute)
    python examples/sine_maml.py --quick         # 1,000 iterations, about 20 seconds
    python examples/sine_maml.py --algorithm fomaml --iterations 5000
    python examples/sine_maml.py --algorithm reptile --quick
    python examples/sine_maml.py --quick --save maml.pt      # keep the meta-trained weights
    python examples/sine_maml.py --load maml.pt              # test them later, no training
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

import fastmeta
from fastmeta.bench import load_checkpoint, save_checkpoint
from fastmeta.data import BatchMetaDataLoader, sinusoid


def evaluate(
    learner: fastmeta.MetaLearner, batch: fastmeta.TaskBatch, steps: tuple[int, ...]
) -> list[float]:
    """Mean query MSE after each number of inner SGD steps, over the tasks of ``batch``."""
    losses = torch.zeros(len(steps))
    for t in range(batch.num_tasks):
        for i, s in enumerate(steps):
            adapted = learner.adapt(batch.support_x[t], batch.support_y[t], steps=s)
            with torch.no_grad():
                losses[i] += torch.mean((adapted(batch.query_x[t]) - batch.query_y[t]) ** 2)
    return (losses / batch.num_tasks).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithm", choices=["maml", "fomaml", "reptile"], default="maml")
    parser.add_argument("--save", help="write the meta-trained learner's checkpoint here")
    parser.add_argument("--load", help="load a saved checkpoint instead of training")
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="1,000 iterations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    iterations = 1000 if args.quick else args.iterations

    torch.set_num_threads(1)  # a tiny MLP: a second thread only adds contention
    torch.manual_seed(args.seed)
    shots, meta_batch_size, eval_steps = 10, 25, 10
    # torchmeta-style task loader: batch["train"] = [x, y], each [25, 10, 1]
    train_tasks = sinusoid(shots, test_shots=shots, preset="maml", seed=args.seed)
    loader = BatchMetaDataLoader(train_tasks, batch_size=meta_batch_size, shuffle=True)
    model = fastmeta.models.SineMLP()  # 1-40-40-1 ReLU
    if args.algorithm == "reptile":  # 5 inner steps: one step would be joint training
        learner: fastmeta.MetaLearner = fastmeta.Reptile(model, inner_lr=0.01, inner_steps=5)
    else:
        cls = fastmeta.MAML if args.algorithm == "maml" else fastmeta.FOMAML
        learner = cls(model, inner_lr=0.01, inner_steps=1)
    untrained = fastmeta.MAML(fastmeta.models.SineMLP(), inner_lr=0.01)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    held_out_tasks = sinusoid(shots, test_shots=shots, preset="maml", seed=args.seed + 1)
    held_out = fastmeta.TaskBatch(*(t for part in next(iter(BatchMetaDataLoader(
        held_out_tasks, batch_size=100))).values() for t in part))

    if args.load:
        # tensors and plain data only, each tensor checked against its SHA-256 digest
        learner.load_state_dict(load_checkpoint(args.load)["state_dict"])
        print(f"loaded {args.load}")
        iterations = 0
    else:
        print(f"{args.algorithm}: {iterations} meta-iterations, engine={learner.engine}")
    start = time.perf_counter()
    for iteration, batch in enumerate(itertools.islice(loader, iterations), start=1):
        result = learner.meta_step(batch, optimizer)
        if iteration % max(1, iterations // 10) == 0:
            elapsed = time.perf_counter() - start
            print(f"  iteration {iteration:>6}  meta-loss {result.loss:7.3f}  "
                  f"({1000 * elapsed / iteration:.1f} ms/iteration)")

    if args.save:
        save_checkpoint(args.save, {"state_dict": learner.state_dict()})  # atomic, digested
        print(f"saved the meta-trained weights to {args.save}")

    print(f"\nquery MSE on 100 held-out tasks, K={shots}, inner SGD lr=0.01:")
    print(f"  {'':<22}{'before':>8}{'1 step':>8}{f'{eval_steps} steps':>10}")
    for name, candidate in (("random init", untrained), (args.algorithm, learner)):
        before, one, last = evaluate(candidate, held_out, (0, 1, eval_steps))
        print(f"  {name:<22}{before:8.3f}{one:8.3f}{last:10.3f}")


if __name__ == "__main__":
    main()

"""Domain-adaptive meta-learning (DAML) on sine waves: adapt from one unlabelled input.

The experiment of the “Meta Learning in PyTorch” blog post (2018). The target is
y = sin(x) or y = sin(x + π) on x ∈ [-2π, 2π]; which one must be inferred from a single
unlabelled source input, drawn from [π/4, π/2] for phase 0 and from [-π/2, -π/4] for
phase π. The model (1-32-32-1 ReLU) takes 5 inner SGD steps (α = 0.03) on a learned
loss: a network over the model's output and both hidden layers, [y, h2, h1] → 32 → 32
→ 1, whose output h gives the inner loss |h|. The model's initialisation and the loss
network are meta-trained together on the L1 error on 4 labelled target points per task
(Adam 3e-3 with cosine decay, 25 tasks per meta-batch, 8,000 iterations).

Afterwards the adapted model is evaluated on 1,000 new tasks (200-point grid) and
plotted against both candidate waves. The experiment lives in fastmeta.bench.daml, the
code behind `fastmeta bench daml` (which adds --resume, --no-plots and every setting as
a flag); this script only calls it.

Usage:
    python examples/daml_sine.py                    # the full run (see README for timings)
    python examples/daml_sine.py --quick            # 500 iterations, under a minute
    python examples/daml_sine.py --iterations 200 --engine higher --out runs/daml_higher
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

from fastmeta.bench import Interrupted, StopFlag, stop_on_signals
from fastmeta.bench.daml import QUICK, DamlConfig, run_daml


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--iterations", type=int, default=None, help="meta-iterations")
    parser.add_argument("--eval-tasks", type=int, default=None, help="new tasks evaluated")
    parser.add_argument("--engine", choices=["auto", "vmap", "higher"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/daml_sine"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args()

    torch.set_num_threads(1)  # tiny networks: one thread is fastest, and fair on a shared machine
    settings = {**(QUICK if args.quick else {}), "seed": args.seed, "engine": args.engine}
    settings.update({k: v for k, v in (("iterations", args.iterations),
                                       ("eval_tasks", args.eval_tasks)) if v is not None})
    flag = StopFlag()
    try:
        with stop_on_signals(flag):  # Ctrl-C or SIGTERM: checkpoint, then stop
            results = run_daml(DamlConfig(**settings), args.out, resume=args.resume, stop=flag)
    except Interrupted as error:
        print(error, file=sys.stderr)
        return error.exit_status
    except FileExistsError as error:  # --out holds a run: --resume, or another --out
        print(error, file=sys.stderr)
        return 1
    print()
    print((args.out / "results.md").read_text())
    if not results["algorithms"]["daml"]["evaluation"]["targets_met"]:
        print("note: the targets were not met (expected for --quick or few iterations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``fastmeta`` command line: ``fastmeta bench ...`` and ``fastmeta eval CHECKPOINT``.

Usage:
    fastmeta bench sine --quick --out runs/sine-quick
    fastmeta bench sine --out runs/sine                      # the MAML paper's protocol
    fastmeta bench sine --out runs/sine --resume             # continue an interrupted run
    fastmeta bench digits --quick --out runs/digits
    fastmeta bench daml --quick --out runs/daml
    fastmeta eval runs/sine/checkpoints/maml.pt --shots 5 --steps 10 --plot
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 5,10,20, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _add_common(parser: argparse.ArgumentParser, *, default_out: str) -> None:
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and tasks")
    parser.add_argument("--quick", action="store_true", help="few iterations and tasks: minutes")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    parser.add_argument(
        "--engine", choices=["auto", "vmap", "higher"], default="auto", help="learner engine"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch intra-op threads (default 1: fastest for these small models, and "
        "leaves the other cores to other work)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmeta", description="fastmeta: meta-learning benchmarks and evaluation."
    )
    parser.add_argument("--version", action="version", version=f"fastmeta {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="run a benchmark").add_subparsers(
        dest="benchmark", required=True
    )
    sine = bench.add_parser(
        "sine",
        help="sine-wave regression: the MAML paper's protocol",
        description="Meta-train each algorithm on sine-wave tasks and evaluate them all on "
        "the same held-out tasks. Defaults: the MAML paper (70,000 iterations).",
    )
    sine.add_argument(
        "--algorithms",
        default="maml,fomaml,reptile,metasgd,anil,transfer,random",
        help="comma-separated subset of maml,fomaml,reptile,metasgd,anil,transfer,random",
    )
    sine.add_argument("--preset", choices=["maml", "reptile"], default="maml")
    sine.add_argument("--iterations", type=_positive_int, help="meta-iterations (70000)")
    sine.add_argument("--meta-batch-size", type=_positive_int, help="tasks per step (25)")
    sine.add_argument("--train-shots", type=_positive_int, help="K in training (10)")
    sine.add_argument("--eval-shots", type=_int_list, help="K in evaluation (5,10,20)")
    sine.add_argument("--eval-steps", type=int, help="fine-tuning steps evaluated (10)")
    sine.add_argument("--eval-tasks", type=_positive_int, help="held-out tasks (600)")
    sine.add_argument("--inner-lr", type=float, help="inner SGD learning rate (0.01)")
    sine.add_argument("--meta-lr", type=float, help="outer Adam learning rate (0.001)")
    sine.add_argument("--checkpoint-every", type=_positive_int, help="iterations (1000)")
    _add_common(sine, default_out="fastmeta-sine")
    sine.set_defaults(handler=_bench_sine)

    digits = bench.add_parser(
        "digits",
        help="few-shot digit classification (offline, scikit-learn's 8x8 digits)",
        description="5-way 1-shot and 5-shot classification on held-out digit classes.",
    )
    digits.add_argument(
        "--algorithms",
        default="maml,fomaml,reptile,anil,metasgd,finetune",
        help="comma-separated subset of maml,fomaml,reptile,anil,metasgd,finetune",
    )
    digits.add_argument("--iterations", type=_positive_int, help="meta-iterations (3000)")
    digits.add_argument("--ways", type=_positive_int, help="classes per task (5)")
    digits.add_argument("--shots", type=_int_list, help="support images per class (1,5)")
    digits.add_argument("--eval-tasks", type=_positive_int, help="held-out tasks (600)")
    digits.add_argument("--checkpoint-every", type=_positive_int, help="iterations (500)")
    _add_common(digits, default_out="fastmeta-digits")
    digits.set_defaults(handler=_bench_digits)

    daml = bench.add_parser(
        "daml",
        help="domain-adaptive meta-learning on the seed's sine tasks (learned inner loss)",
        description="Meta-train DAML: the phase (0 or pi) of a sine wave is inferred from "
        "one unlabelled source input; 5 inner steps on a learned loss, L1 outer loss.",
    )
    daml.add_argument("--iterations", type=_positive_int, help="meta-iterations (8000)")
    daml.add_argument("--eval-tasks", type=_positive_int, default=1000, help="new tasks")
    daml.add_argument("--out", type=Path, default=Path("fastmeta-daml"), help="output directory")
    daml.add_argument("--seed", type=int, default=0, help="seed of weights and tasks")
    daml.add_argument("--quick", action="store_true", help="500 iterations: under a minute")
    daml.add_argument(
        "--engine", choices=["auto", "vmap", "higher"], default="auto", help="learner engine"
    )
    daml.add_argument("--threads", type=_positive_int, default=1, help="torch threads (1)")
    daml.add_argument("--quiet", action="store_true", help="no progress lines")
    daml.set_defaults(handler=_bench_daml)

    evaluate = commands.add_parser(
        "eval",
        help="fine-tune and evaluate a saved learner",
        description="Evaluate a checkpoint written by `fastmeta bench` on its benchmark's "
        "held-out tasks (the same tasks and numbers as the bench run, unless overridden).",
    )
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--shots", type=_int_list, help="support points (default: the run's)")
    evaluate.add_argument("--steps", type=int, help="fine-tuning steps (default: the run's)")
    evaluate.add_argument("--tasks", type=_positive_int, help="held-out tasks (the run's)")
    evaluate.add_argument("--plot", action="store_true", help="write figures to --out")
    evaluate.add_argument("--out", type=Path, default=Path("."), help="where figures go")
    evaluate.add_argument("--json", action="store_true", help="print the results as JSON")
    evaluate.add_argument("--threads", type=_positive_int, default=1)
    evaluate.set_defaults(handler=_eval)
    return parser


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _run_bench(args: argparse.Namespace, run: Callable[..., dict[str, Any]], config: Any) -> int:
    from . import distributed as fmd
    from .bench import Interrupted, StopFlag, TrainingDiverged
    from .bench._train import stop_on_sigint

    fmd.init_from_env()  # under torchrun: join the job; otherwise nothing
    main_process = fmd.is_main_process()
    progress = not args.quiet
    log: Callable[[str], None] = print if main_process and not args.quiet else (lambda _: None)
    flag = StopFlag()
    try:
        with stop_on_sigint(flag):
            results = run(
                config, args.out, resume=args.resume, progress=progress,
                plots=not args.no_plots, stop=flag, log=log,
            )
    except Interrupted as error:
        if main_process:
            print(f"fastmeta: {error}", file=sys.stderr)
        return 130
    except (TrainingDiverged, FileExistsError, ImportError) as error:
        print(f"fastmeta: error: {error}", file=sys.stderr)
        return 1
    finally:
        if fmd.is_distributed():
            torch.distributed.destroy_process_group()
    if not main_process:
        return 0
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}"
          + "".join(f", {args.out / f}" for f in results.get("figures", [])))
    return 0


def _bench_sine(args: argparse.Namespace) -> int:
    from .bench._registry import parse_algorithms
    from .bench.sine import SINE_ALGORITHMS, SineConfig, quick_config, run_sine

    settings = _overrides(
        args,
        [
            "iterations", "meta_batch_size", "train_shots", "eval_shots", "eval_steps",
            "eval_tasks", "inner_lr", "meta_lr", "checkpoint_every",
        ],
    )
    settings.update(
        algorithms=tuple(parse_algorithms(args.algorithms, SINE_ALGORITHMS)),
        preset=args.preset,
        seed=args.seed,
        engine=args.engine,
    )
    config = quick_config(**settings) if args.quick else SineConfig(**settings)
    return _run_bench(args, run_sine, config)


def _bench_digits(args: argparse.Namespace) -> int:
    from .bench._registry import parse_algorithms
    from .bench.digits import DIGITS_ALGORITHMS, DigitsConfig, quick_digits_config, run_digits

    settings = _overrides(args, ["iterations", "ways", "shots", "eval_tasks", "checkpoint_every"])
    settings.update(
        algorithms=tuple(parse_algorithms(args.algorithms, DIGITS_ALGORITHMS)),
        seed=args.seed,
        engine=args.engine,
    )
    config = quick_digits_config(**settings) if args.quick else DigitsConfig(**settings)
    return _run_bench(args, run_digits, config)


def _bench_daml(args: argparse.Namespace) -> int:
    from .bench import Progress
    from .bench.daml import run_daml

    bar: Progress | None = None

    def progress(iteration: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, "daml", enabled=not args.quiet)
        bar.update(iteration, loss)

    results = run_daml(
        args.out, iterations=args.iterations, quick=args.quick, seed=args.seed,
        eval_tasks=args.eval_tasks, engine=args.engine, progress=progress,
    )
    if bar is not None:
        bar.close()
    print((args.out / "results.md").read_text().strip())
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, "
          f"{args.out / 'daml_sine.png'}")
    return 0 if results else 1


def _eval(args: argparse.Namespace) -> int:
    from .bench import _evaluate_checkpoint

    try:
        report = _evaluate_checkpoint.evaluate_checkpoint(
            args.checkpoint, shots=args.shots, steps=args.steps, tasks=args.tasks,
            plot_dir=args.out if args.plot else None,
        )
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"fastmeta: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report["results"], indent=1))
    else:
        print(report["text"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastmeta`` console script and ``python -m fastmeta``."""
    parser = _parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return int(args.handler(args))
    except ValueError as error:  # invalid settings: report like argparse does
        parser.exit(2, f"fastmeta: error: {error}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

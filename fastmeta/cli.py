"""The ``fastmeta`` command line: ``fastmeta bench ...`` and ``fastmeta eval CHECKPOINT``.

Usage:
    fastmeta bench sine --quick --out runs/sine-quick
    fastmeta bench sine --out runs/sine                      # the MAML paper's protocol
    fastmeta bench sine --out runs/sine --resume             # continue an interrupted run
    fastmeta bench digits --quick --out runs/digits
    fastmeta bench daml --quick --out runs/daml
    fastmeta bench omniglot --root data --download 1 --out runs/omniglot   # needs the data
    fastmeta bench miniimagenet --root data --out runs/miniimagenet
    fastmeta eval runs/sine/checkpoints/maml.pt --shots 5 --steps 10 --plot

The flags of each ``bench`` command are generated from its configuration dataclass
(``fastmeta.bench.sine.SineConfig``...): names, defaults and help are written once, there.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import __version__

EXIT_FAILED = 1
# Set once this process has torn down a torch.distributed process group (see run()).
_left_a_process_group = False


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 5,10,20, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _names(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    from .bench._registry import parse_algorithms

    def parse(text: str) -> tuple[str, ...]:
        try:
            return tuple(parse_algorithms(text, choices))
        except ValueError as error:  # argparse names the option itself
            raise argparse.ArgumentTypeError(str(error).removeprefix("--algorithms: ")) from None

    return parse


def _log_formats(text: str) -> tuple[str, ...]:
    from .bench._loggers import LOG_FORMATS

    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in chosen if name not in LOG_FORMATS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"expected formats from {','.join(LOG_FORMATS)} (comma-separated), got {text!r}")
    return chosen


def _show(value: Any) -> str:
    """A default as the command line spells it."""
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _add_settings(parser: argparse.ArgumentParser, bench: Any) -> None:
    """One flag per field of ``bench.config``, its help with the default (and --quick's)."""
    from .bench._config import fields_of

    group = parser.add_argument_group(f"settings of {bench.config.__name__}")
    for field in fields_of(bench.config):
        shown = f"default: {_show(field.default)}"
        if field.name in bench.quick:
            shown += f"; --quick: {_show(bench.quick[field.name])}"
        kinds: dict[str, Callable[[str], Any]] = {
            "int": _int, "float": _float, "str": str, "ints": _ints,
        }
        kind = kinds.get(field.kind) or _names(field.choices or ())
        options: dict[str, Any] = {
            "metavar": {"int": "N", "float": "X", "str": "TEXT", "ints": "N,N",
                        "strs": "NAME,NAME"}[field.kind],
        }
        if field.kind == "str" and field.choices:
            options.pop("metavar")
            options["choices"] = field.choices
        elif field.kind == "strs":
            shown = f"comma-separated, from {','.join(field.choices or ())}; {shown}"
        group.add_argument(
            field.flag, type=kind, default=None, dest=f"setting_{field.name}",
            help=f"{field.help} ({shown})".replace("%", "%%"), **options,
        )


def _add_bench(commands: Any, bench: Any) -> None:
    quick = ", ".join(f"--{k.replace('_', '-')} {_show(v)}" for k, v in bench.quick.items())
    parser = commands.add_parser(bench.name, help=bench.help, description=bench.description)
    _add_settings(parser, bench)
    run = parser.add_argument_group("running")
    run.add_argument("--out", type=Path, default=Path(f"fastmeta-{bench.name}"),
                     help=f"output directory (default: fastmeta-{bench.name}); one run at a "
                     f"time: a second run into it is refused")
    run.add_argument("--quick", action="store_true",
                     help=f"a short run: sets {quick} (flags given explicitly win)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out: every checkpoint is checked against "
                     "the settings first; results.json is merged per algorithm")
    run.add_argument("--threads", type=_positive_int, default=1,
                     help="torch intra-op threads (default: 1, fastest for these small "
                     "models, and leaves the other cores to other work)")
    _add_device_options(run, precision_default="fp32")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    run.add_argument("--quiet", action="store_true", help="no progress or status lines")
    run.add_argument("--log", type=_log_formats, default=(), metavar="FORMAT,FORMAT",
                     help="also write curves, evaluation, engines and settings under OUT/logs "
                     "for csv and/or tensorboard (comma-separated)")
    parser.set_defaults(handler=_bench, benchmark=bench.name)


class _Parser(argparse.ArgumentParser):
    """argparse, without a usage dump of many lines above a one-line error."""

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage()
        shown = usage if usage.count("\n") <= 3 else ""
        self.exit(2, f"{shown}{self.prog}: error: {message}\n"
                     f"(`{self.prog} --help` lists every option)\n")


def _add_device_options(group: Any, *, precision_default: str | None) -> None:
    """``--device`` and ``--precision`` (recorded in results.json and eval's report)."""
    from ._precision import PRECISIONS

    group.add_argument("--device", default="auto",
                       help="where to compute: auto (default: cuda if available, then mps, "
                       "then cpu), cpu, cuda, cuda:N or mps; under torchrun each process "
                       "uses its own GPU, cuda:LOCAL_RANK")
    shown = precision_default or "the precision the checkpoint was trained in, else fp32"
    group.add_argument("--precision", choices=PRECISIONS, default=precision_default,
                       help=f"autocast precision of both loops, weights kept in float32; "
                       f"fp16 scales the outer loss and skips steps that overflow "
                       f"(default: {shown})")


def _parser() -> argparse.ArgumentParser:
    from .bench import benchmark, names

    parser = _Parser(
        prog="fastmeta", description="fastmeta: meta-learning benchmarks and evaluation."
    )
    parser.add_argument("--version", action="version", version=f"fastmeta {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="run a benchmark",
        description="Meta-train and evaluate; SIGINT (Ctrl-C) or SIGTERM checkpoints after "
        "the current meta-iteration and exits with status 128 + the signal number (130, "
        "143); --resume continues.",
    ).add_subparsers(dest="benchmark", required=True)
    for name in names():
        _add_bench(bench, benchmark(name))

    evaluate = commands.add_parser(
        "eval",
        help="fine-tune and evaluate a saved learner",
        description="Evaluate a checkpoint written by `fastmeta bench` on its benchmark's "
        "held-out tasks (the same tasks and numbers as the bench run, unless overridden).",
    )
    evaluate.add_argument("checkpoint", type=Path, help="a file from OUT/checkpoints/")
    evaluate.add_argument("--shots", type=_ints,
                          help="support points or images per class (default: the run's)")
    evaluate.add_argument("--steps", type=_int, help="fine-tuning steps (default: the run's)")
    evaluate.add_argument("--tasks", type=_positive_int,
                          help="held-out tasks (default: the run's)")
    evaluate.add_argument("--plot", action="store_true", help="write figures to --out")
    evaluate.add_argument("--out", type=Path, default=Path("."),
                          help="where figures go (default: the current directory)")
    evaluate.add_argument("--json", action="store_true",
                          help="print the results as strict JSON (non-finite numbers as the "
                          "strings \"nan\", \"inf\", \"-inf\")")
    evaluate.add_argument("--threads", type=_positive_int, default=1,
                          help="torch intra-op threads (default: 1)")
    _add_device_options(evaluate, precision_default=None)
    evaluate.set_defaults(handler=_eval)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from . import distributed as fmd
    from .bench import (
        CheckpointError,
        Interrupted,
        OutDirError,
        RunLocked,
        StopFlag,
        TrainingDiverged,
        benchmark,
        run_benchmark,
        stop_on_signals,
    )
    from .bench._device import process_group_backend, resolve_device

    bench = benchmark(args.benchmark)
    prefix = "setting_"
    settings = {k[len(prefix):]: v for k, v in vars(args).items()
                if k.startswith(prefix) and v is not None}
    config = bench.quick_config(**settings) if args.quick else bench.config(**settings)

    device = resolve_device(args.device)  # under torchrun: this process's own GPU
    fmd.init_from_env(backend=process_group_backend(device))  # torchrun: join the job
    main_process = fmd.is_main_process()
    log: Callable[[str], None] = print if main_process and not args.quiet else (lambda _: None)
    flag = StopFlag()
    finished = False
    try:
        with stop_on_signals(flag):
            results = run_benchmark(bench, config, args.out, resume=args.resume,
                                    progress=not args.quiet, plots=not args.no_plots,
                                    stop=flag, log=log, log_to=args.log, device=device,
                                    precision=args.precision)
        finished = True
    except Interrupted as error:
        if main_process:
            print(f"fastmeta: {error}", file=sys.stderr)
        return error.exit_status
    except (TrainingDiverged, FileExistsError, ImportError, OutDirError, RunLocked,
            CheckpointError, FileNotFoundError, ConnectionError) as error:
        if main_process:
            print(f"fastmeta: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        if fmd.is_distributed():
            # Every rank leaves together: a rank that tears gloo down while another still
            # writes the results can abort at exit ("terminate called without an active
            # exception"). After an error the ranks may not all get here, so no barrier.
            if finished:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            global _left_a_process_group
            _left_a_process_group = True
    if main_process:
        written = ["results.json", "results.md", *results.get("figures", [])]
        print("wrote " + ", ".join(str(args.out / name) for name in written))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .bench import CheckpointError, evaluate_checkpoint
    from .bench._config import dumps

    try:
        report = evaluate_checkpoint(
            args.checkpoint, shots=args.shots, steps=args.steps, tasks=args.tasks,
            plot_dir=args.out if args.plot else None, device=args.device,
            precision=args.precision,
        )
    except (FileNotFoundError, CheckpointError, ValueError, ImportError) as error:
        print(f"fastmeta: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(dumps({k: v for k, v in report.items() if k != "text"}))
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


def run() -> NoReturn:
    """The ``fastmeta`` console script and ``python -m fastmeta``: :func:`main`, then exit.

    A process that ran in a ``torch.distributed`` job leaves with ``os._exit`` once its
    output is flushed: with gloo, the interpreter's own finalization after
    ``destroy_process_group()`` aborted a rank now and then ("terminate called without an
    active exception", SIGABRT) when everything had been written.
    """
    code = main()
    if _left_a_process_group:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()

"""The table a GPU user wants: ms per meta-step and peak memory, for every engine and the
hand-written references, in float32 and bfloat16.

Usage:
    python benchmarks/gpu.py                      # every shape; on one GPU in under 5 minutes
    python benchmarks/gpu.py --quick              # tiny shapes, on whatever device (the tests)
    python benchmarks/gpu.py --only sine resnet12 --precisions bf16 --device cuda:1
    python benchmarks/gpu.py --json gpu.json      # every number, for the README

Shapes (second-order MAML; meta-batch, inner steps and learning rates of
``benchmarks/scale.py``): the sine MLP (25 tasks), Conv-4 at the Omniglot shape (64 channels,
1x28x28, 5-way 1-shot, 32 tasks) and at the miniImageNet shape (32 channels, 3x84x84, 5
steps), ResNet-12 (64-160-320-640, miniImageNet shape), a small Transformer encoder, and
GPT-2-small (124M parameters, ``GPT2Config()``) with LoRA (r = 8 on ``c_attn``, through
peft) adapting only the LoRA weights, 4 tasks of 4 sequences of 64 tokens, 2 classes.
``--quick`` shrinks every model and batch so that the whole table takes seconds on a CPU.

Rows: ``reference`` (the plain per-task loop written out: ``functional_call`` and
``torch.autograd.grad`` per task), ``hand-vmap`` (``grad`` inside ``vmap`` over the tasks, as
torch.func's documentation writes it), then fastmeta's engines ``auto`` (the default, after
its check and tuning steps), ``vmap``, ``loop`` and ``higher``. bf16 runs the references
under ``torch.autocast`` and fastmeta with ``precision="bf16"``. Each cell is the median of
``--repeats`` meta-steps after a warm-up, with the peak memory of one meta-step on CUDA
(``torch.cuda.max_memory_allocated`` above what was allocated before it; the CPU has no
per-step counter, so the column is empty there: ``benchmarks/scale.py`` measures it in
fresh processes). A row that cannot run a model says why under the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastmeta

_SPEC = importlib.util.spec_from_file_location("scale", Path(__file__).with_name("scale.py"))
assert _SPEC is not None and _SPEC.loader is not None
scale = importlib.util.module_from_spec(_SPEC)
sys.modules.setdefault("scale", scale)
_SPEC.loader.exec_module(scale)

ROWS = ("reference", "hand-vmap", "auto", "vmap", "loop", "higher")
PRECISIONS = ("fp32", "bf16")


class SequenceClassifier(nn.Module):
    """A Hugging Face sequence classifier that returns its logits (a tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits


def gpt2_lora(quick: bool) -> nn.Module:
    """GPT-2-small (``--quick``: 2 layers of width 64) with LoRA r = 8 on ``c_attn``."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    size = {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 128} if quick else {}
    config = GPT2Config(num_labels=2, pad_token_id=0, attn_implementation="eager",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **size)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on fan-in/fan-out of Conv1D layers
        model = get_peft_model(GPT2ForSequenceClassification(config),
                               LoraConfig(r=8, target_modules=["c_attn"], lora_dropout=0.0,
                                          fan_in_fan_out=True))
    return SequenceClassifier(model)


def _tokens(vocab: int, length: int, shots: int) -> Callable[[int], fastmeta.TaskBatch]:
    def batch(tasks: int) -> fastmeta.TaskBatch:
        g = torch.Generator().manual_seed(0)
        labels = torch.arange(2).repeat_interleave(shots // 2).repeat(tasks, 1)
        return fastmeta.TaskBatch(torch.randint(1, vocab, (tasks, shots, length), generator=g),
                                  labels,
                                  torch.randint(1, vocab, (tasks, shots, length), generator=g),
                                  labels)

    return batch


@dataclass(frozen=True)
class Shape:
    """One configuration of the table: ``scale.Config`` plus what the rows need."""

    config: Any  # scale.Config
    tasks: int
    adapt: str | None = None  # the learner's adapt= (LoRA: "*lora_*")
    rows: tuple[str, ...] = ROWS


def shapes(quick: bool) -> dict[str, Shape]:
    """The configurations at their full size, or tiny for ``--quick``."""
    c = scale.CONFIGS
    if not quick:
        return {
            "sine": Shape(c["sine"], 25),
            "omniglot": Shape(c["omniglot"], 32),
            "miniimagenet": Shape(c["miniimagenet"], 4),
            "resnet12": Shape(c["resnet12"], 2),
            "transformer": Shape(c["transformer"], 4),
            "gpt2-lora": Shape(replace(c["transformer"], model=lambda: gpt2_lora(False),
                                       batch=_tokens(50257, 64, 4), inner_lr=0.01),
                               4, adapt="*lora_*", rows=("reference", "auto", "loop")),
        }
    return {
        "sine": Shape(c["sine"], 25),
        "omniglot": Shape(replace(c["omniglot"], model=lambda: fastmeta.models.Conv4(
            in_channels=1, num_classes=5, hidden=8, image_size=28)), 2),
        "miniimagenet": Shape(replace(c["miniimagenet"], steps=2,
                                      batch=scale._images(3, 32, 5, 1, 2),
                                      model=lambda: fastmeta.models.Conv4(
                                          in_channels=3, num_classes=5, hidden=8,
                                          image_size=32)), 1),
        "resnet12": Shape(replace(c["resnet12"], batch=scale._images(3, 32, 5, 1, 2),
                                  model=lambda: fastmeta.models.ResNet12(
                                      in_channels=3, num_classes=5, channels=(4, 4, 8, 8))),
                          1),
        "transformer": Shape(c["transformer"], 2),
        "gpt2-lora": Shape(replace(c["transformer"], model=lambda: gpt2_lora(True),
                                   batch=_tokens(128, 8, 4), inner_lr=0.01),
                           2, adapt="*lora_*", rows=("reference", "auto", "loop")),
    }


def build(row: str, shape: Shape, device: torch.device, precision: str
          ) -> Callable[[fastmeta.TaskBatch], None]:
    """One meta-step of ``row`` in ``precision`` (a zeroing, the meta-gradient, an outer
    SGD step with learning rate 0, so that every repeat sees the same model)."""
    config = shape.config
    if shape.adapt is None or row in scale.WRITTEN_HERE:
        step = scale.build(row, config, str(device))  # the references adapt what trains
    else:
        torch.manual_seed(0)
        model = config.model().to(device).train()
        learner = fastmeta.MAML(model, inner_lr=config.inner_lr, inner_steps=config.steps,
                                loss_fn=config.loss, engine=row, adapt=shape.adapt)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)

        def meta_step(task: fastmeta.TaskBatch) -> None:
            learner.meta_step(task, optimizer)

        meta_step.learner = learner  # type: ignore[attr-defined]
        step = meta_step
    learner = getattr(step, "learner", None)
    if learner is not None:
        learner.precision = precision
        return step
    if precision == "fp32":
        return step

    def autocast_step(task: fastmeta.TaskBatch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            step(task)

    return autocast_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[fastmeta.TaskBatch], None], task: fastmeta.TaskBatch,
            device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median ms per meta-step, peak MiB of one meta-step on CUDA or ``None``)."""
    scale.warm_up(step, task)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step(task)
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(task)
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return 1e3 * statistics.median(times), peak


def run(names: list[str], precisions: list[str], device: torch.device, quick: bool,
        repeats: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Every cell of the table: ``{shape: {precision: {row: {...}}}}``."""
    table: dict[str, Any] = {}
    known = shapes(quick)
    for name in names:
        shape = known[name]
        try:
            task = fastmeta.TaskBatch(*(t.to(device) for t in shape.config.batch(shape.tasks)))
        except ImportError as error:  # transformers or peft missing
            table[name] = {"unavailable": f"{type(error).__name__}: {error}"}
            log(f"{name}: skipped ({error})")
            continue
        table[name] = {}
        for precision in precisions:
            cells: dict[str, Any] = {}
            for row in ROWS:
                if row not in shape.rows:
                    cells[row] = {"error": "does not run this model (see the note)"}
                    continue
                started = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # auto's notes on its choice
                        step = build(row, shape, device, precision)
                        ms, peak = measure(step, task, device, repeats)
                except Exception as error:  # a row that cannot run this model
                    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    cells[row] = {"error": f"{type(error).__name__}: {first[:160]}"}
                    log(f"{name} {precision} {row}: {cells[row]['error']}")
                    continue
                learner = getattr(step, "learner", None)
                cells[row] = {"ms": ms, "peak_mib": peak,
                              "engine": learner.engine if learner is not None else row}
                log(f"{name} {precision} {row}: {ms:.2f} ms "
                    f"({time.perf_counter() - started:.1f} s with warm-up)")
            table[name][precision] = cells
    return table


def markdown(table: dict[str, Any], device: torch.device, quick: bool) -> str:
    """The table: one line per shape and precision, one column per row."""
    lines = [f"ms per second-order meta-step (median) · peak MiB of one meta-step; "
             f"{device}{' (--quick shapes)' if quick else ''}", "",
             "| shape | precision | " + " | ".join(ROWS) + " | auto runs |",
             "|---" * (len(ROWS) + 3) + "|"]
    notes = []
    for name, by_precision in table.items():
        if "unavailable" in by_precision:
            notes.append(f"- {name}: not run ({by_precision['unavailable']})")
            continue
        for precision, cells in by_precision.items():
            shown = []
            for row in ROWS:
                cell = cells[row]
                if "error" in cell:
                    shown.append("—")
                    if "see the note" not in cell["error"]:
                        notes.append(f"- {name} {precision} {row}: {cell['error']}")
                    continue
                text = f"{cell['ms']:.2f}"
                if cell["peak_mib"] is not None:
                    text += f" · {cell['peak_mib']:.0f}"
                shown.append(text)
            auto = cells["auto"].get("engine", "—")
            lines.append(f"| {name} | {precision} | {' | '.join(shown)} | {auto} |")
    if any(s.rows != ROWS for s in shapes(quick).values()):
        notes.append("- gpt2-lora: torch.func refuses GPT2ForSequenceClassification with "
                     "peft's LoRA (a data-dependent check in transformers' code) and higher "
                     "cannot copy peft's classes, so hand-vmap, vmap and higher do not run "
                     "it; auto times the per-task engines that do and keeps the fastest")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and batches: seconds on a CPU")
    parser.add_argument("--only", nargs="+", choices=list(shapes(False)),
                        default=list(shapes(False)))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--device", default="auto",
                        help="auto (cuda if available, then mps, then cpu), cpu, cuda, cuda:N")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed meta-steps per cell after the warm-up (default 10; "
                             "--quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    from fastmeta.bench._device import resolve_device

    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 10)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    table = run(args.only, args.precisions, device, args.quick, repeats, log)
    print(markdown(table, device, args.quick))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    result = {"device": str(device), "device_name": name, "quick": args.quick,
              "repeats": repeats, "seconds": time.perf_counter() - started, "table": table}
    print(f"\n{name}, torch {torch.__version__}, {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

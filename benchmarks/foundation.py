"""Pretrained-size transformers with LoRA adapters: fastmeta's engines against a plain loop.

Usage:
    python benchmarks/foundation.py --quick      # tiny BERT, GPT-2 and LoRA BERT: seconds
    python benchmarks/foundation.py              # GPT-2-small and BERT-base with LoRA: hours
    python benchmarks/foundation.py --models gpt2-small --algorithms maml --steps 1 \\
        --rows default loop plain --repeats 2   # the 124M GPT-2 + LoRA meta-step alone

Models, built from configs with random weights (nothing is downloaded), fed token ids with
a padded ``attention_mask`` (every other sequence padded to half its length):

- ``gpt2-small``: ``GPT2LMHeadModel(GPT2Config())``, 124M parameters, LoRA r = 8 on
  ``c_attn`` (294,912 adapter weights), next-token loss; 4 tasks × 4 sequences × 64 tokens;
- ``bert-base``: ``BertForSequenceClassification(BertConfig())``, 110M parameters, LoRA r = 8
  on ``query`` and ``value``, 2 classes; 4 tasks × 4 sequences × 64 tokens;
- ``--quick``: ``bert-tiny`` and ``gpt2-tiny`` (hidden size 32, 2 layers, every weight
  meta-learned) and ``bert-tiny-lora`` (its LoRA adapters only), 4 tasks × 4 × 16 tokens.

Algorithms: second-order MAML (``maml``), first-order MAML (``fomaml``) and iMAML
(``imaml``, λ = 1, 5 conjugate-gradient steps), each with 1 and 5 inner SGD steps. Rows:
``default`` (``engine="auto"`` once its check and its timing steps are done: the engine it
settled on is named), the ``vmap``, ``loop`` and ``higher`` engines, ``checkpointed``
(``LoopEngine(checkpoint_steps=True)``: each inner step recomputed in the backward pass
instead of kept), and ``plain``: a
hand-written per-task loop (``functional_call`` and ``torch.autograd.grad`` per task, one
``backward`` per task; MAML and first-order MAML only). An engine that cannot run a model
shows its error. Each row is one whole meta-iteration (zeroing the gradients, the
meta-gradient, an SGD step with learning rate 0 so that every row sees the same model),
timed ``--repeats`` times in rounds that visit the rows in an order drawn afresh each round
(a fixed order favours some rows on a busy machine), on the same batch: the
median is shown, and ``default/best`` divides the default's median by the fastest exact
engine's. ``err`` is each row's largest meta-gradient difference from the plain loop's (or
from ``loop`` where there is no plain row), relative to the largest entry. ``+MiB``: the
resident-set high-water mark of one more meta-step above the memory in use before it (the
process re-runs itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors return
to the OS and the mark follows live memory).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastmeta

ROWS = ("default", "vmap", "loop", "checkpointed", "higher", "plain")
ALGORITHMS = ("maml", "fomaml", "imaml")
INNER_LR = 0.01


@dataclass(frozen=True)
class Spec:
    """One model: how to build it, its batch and its loss."""

    family: str  # "gpt2" or "bert"
    size: str  # "small" (the released size) or "tiny"
    lora: tuple[str, ...] | None  # target modules of a LoRA r = 8 adapter, or None
    tokens: int


MODELS = {
    "gpt2-small": Spec("gpt2", "small", ("c_attn",), 64),
    "bert-base": Spec("bert", "small", ("query", "value"), 64),
    "bert-tiny": Spec("bert", "tiny", None, 16),
    "gpt2-tiny": Spec("gpt2", "tiny", None, 16),
    "bert-tiny-lora": Spec("bert", "tiny", ("query", "value"), 16),
}
QUICK_MODELS = ("bert-tiny", "gpt2-tiny", "bert-tiny-lora")
FULL_MODELS = ("gpt2-small", "bert-base")


def build_model(spec: Spec, seed: int = 0) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    tiny = dict(n_embd=32, n_layer=2, n_head=2, n_positions=spec.tokens, vocab_size=100) \
        if spec.family == "gpt2" else dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=spec.tokens, vocab_size=100)
    extra = tiny if spec.size == "tiny" else {}
    model: nn.Module
    if spec.family == "gpt2":
        config = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         **extra)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(hidden_dropout_prob=0.0, num_labels=2,
                                         attention_probs_dropout_prob=0.0, **extra)
        model = transformers.BertForSequenceClassification(config)
    if spec.lora is not None:
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft 0.21 on transformers 5
            model = peft.get_peft_model(model, peft.LoraConfig(
                target_modules=list(spec.lora), r=8, lora_alpha=16, lora_dropout=0.0))
    return model.train()


def make_batch(spec: Spec, tasks: int = 4, shots: int = 4, seed: int = 0) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    vocab = 100 if spec.size == "tiny" else (50257 if spec.family == "gpt2" else 30522)

    def part() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ids = torch.randint(1, vocab, (tasks, shots, spec.tokens), generator=g)
        mask = torch.ones_like(ids)
        mask[:, ::2, spec.tokens // 2:] = 0  # every other sequence padded to half its length
        ids = ids * mask
        if spec.family == "gpt2":  # next token, padding ignored
            target = torch.cat([ids[..., 1:], torch.zeros_like(ids[..., :1])], -1)
            target = target.masked_fill(torch.cat([mask[..., 1:], mask[..., :1] * 0], -1) == 0,
                                        -100)
        else:
            target = torch.randint(0, 2, (tasks, shots), generator=g)
        return {"input_ids": ids, "attention_mask": mask}, target

    (sx, sy), (qx, qy) = part(), part()
    return fastmeta.TaskBatch(sx, sy, qx, qy)


def loss_fn(output: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on ``output.logits``: per token for a language model, else per sequence."""
    logits = output.logits
    return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)


def learner(model: nn.Module, algorithm: str, steps: int, row: str) -> fastmeta.MetaLearner:
    engine: str | fastmeta.engines.Engine = {
        "default": "auto", "checkpointed": fastmeta.engines.LoopEngine(checkpoint_steps=True),
    }.get(row, row)
    common: dict[str, Any] = dict(inner_lr=INNER_LR, inner_steps=steps, loss_fn=loss_fn,
                                  engine=engine)
    if algorithm == "imaml":
        return fastmeta.IMAML(model, lam=1.0, cg_steps=5, **common)
    return fastmeta.MAML(model, first_order=algorithm == "fomaml", **common)


def plain_step(model: nn.Module, task: fastmeta.TaskBatch, steps: int, first_order: bool) -> None:
    """The hand-written reference: one task at a time, ``backward`` per task (attention on
    the math kernel: CPU's fused kernel has no second derivative)."""
    with sdpa_kernel(SDPBackend.MATH):
        _plain_tasks(model, task, steps, first_order)


def _plain_tasks(model: nn.Module, task: fastmeta.TaskBatch, steps: int,
                 first_order: bool) -> None:
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for t in range(task.num_tasks):
        support = {k: v[t] for k, v in task.support_x.items()}
        query = {k: v[t] for k, v in task.query_x.items()}
        fast = dict(adapter)
        for _ in range(steps):
            loss = loss_fn(functional_call(model, fast, (), support), task.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {n: p - INNER_LR * (g.detach() if first_order else g)
                    for (n, p), g in zip(fast.items(), grads)}
        query_loss = loss_fn(functional_call(model, fast, (), query), task.query_y[t])
        (query_loss / task.num_tasks).backward(inputs=list(
            fast.values() if first_order else adapter.values()))
        if first_order:  # the query gradient at the adapted weights, on the initial ones
            for name, value in fast.items():
                grad = value.grad / 1.0
                value.grad = None
                param = adapter[name]
                param.grad = grad if param.grad is None else param.grad + grad


def make_row(row: str, model: nn.Module, algorithm: str, steps: int
             ) -> tuple[Callable[[fastmeta.TaskBatch], None], fastmeta.MetaLearner | None]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0)
    if row == "plain":
        def step(task: fastmeta.TaskBatch) -> None:
            optimizer.zero_grad(set_to_none=True)
            plain_step(model, task, steps, algorithm == "fomaml")
            optimizer.step()

        return step, None
    meta = learner(model, algorithm, steps, row)
    return (lambda task: meta.meta_step(task, optimizer) and None), meta


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_mib(step: Callable[[], None]) -> float | None:
    """High-water mark of the resident set during ``step()`` above the memory before it."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM
    except OSError:
        step()
        return None
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    scale = max(float(g.abs().max()) for g in reference.values())
    if set(grads) != set(reference):
        return float("inf")
    return max(float((grads[n] - reference[n]).abs().max()) for n in reference) / scale


def progress(line: str) -> None:
    """One line on stderr while a long run goes on (the table goes to stdout)."""
    print(f"  [{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def run_case(model: nn.Module, spec: Spec, algorithm: str, steps: int, rows: list[str],
             repeats: int, max_tuning: int = 12) -> list[dict[str, Any]]:
    """Every row on one (model, algorithm, inner steps): time, memory, error, engine."""
    task = make_batch(spec)
    results: list[dict[str, Any]] = []
    live: dict[str, tuple[Callable[[fastmeta.TaskBatch], None], Any]] = {}
    for row in rows:
        if row == "plain" and algorithm == "imaml":
            continue
        result: dict[str, Any] = {"row": row}
        results.append(result)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step, meta = make_row(row, model, algorithm, steps)
                step(task)  # warm-up (and, for the default, its check)
                for _ in range(max_tuning if row == "default" else 0):
                    if not meta.engine_decision.tuning:
                        break
                    step(task)
        except Exception as error:  # an engine that cannot run the model: say which error
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:70]}"
            continue
        live[row] = (step, meta)
        result["engine"] = meta.engine if meta is not None else "plain"
        progress(f"{row}: ready on {result['engine']}")
    times: dict[str, list[float]] = {row: [] for row in live}
    for round_ in range(repeats):  # rounds: every row once, in an order drawn afresh
        order = list(live)
        random.Random(round_).shuffle(order)
        for row in order:
            step = live[row][0]
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step(task)
            times[row].append(time.perf_counter() - start)
            progress(f"{row}: {times[row][-1]:.2f} s")
    grads: dict[str, dict[str, torch.Tensor]] = {}
    for row, (step, _) in live.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mib = peak_mib(lambda step=step: step(task))
        grads[row] = _grads(model)
        result = next(r for r in results if r["row"] == row)
        result.update(ms=1e3 * statistics.median(times[row]), mib=mib)
    reference = grads.get("plain") or grads.get("loop")
    for result in results:
        if reference is not None and result["row"] in grads:
            result["err"] = _error(grads[result["row"]], reference)
    return results


def print_table(name: str, algorithm: str, steps: int, results: list[dict[str, Any]]) -> None:
    engines = [r for r in results if "ms" in r
               and r["row"] in ("vmap", "loop", "checkpointed", "higher")]
    default = next((r for r in results if r["row"] == "default" and "ms" in r), None)
    ratio = ""
    if default is not None and engines:
        ratio = f"   default/best engine {default['ms'] / min(r['ms'] for r in engines):.2f}"
    print(f"\n{name}, {algorithm}, {steps} inner step{'s' if steps > 1 else ''}{ratio}")
    print(f"  {'row':<12} {'engine':<8} {'ms/step':>10} {'+MiB':>8} {'err':>9}")
    for r in results:
        if "error" in r:
            print(f"  {r['row']:<12} fails: {r['error']}")
            continue
        mib = "-" if r.get("mib") is None else f"{max(r['mib'], 0.0):.0f}"
        err = f"{r['err']:.1e}" if "err" in r else "-"
        print(f"  {r['row']:<12} {r['engine']:<8} {r['ms']:>10.1f} {mib:>8} {err:>9}")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, for CI")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds (default 5 with --quick, else 2)")
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.steps):
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    args.models = args.models or list(QUICK_MODELS if args.quick else FULL_MODELS)
    args.repeats = args.repeats or (5 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
          f"{args.repeats} timed rounds")
    for name in args.models:
        spec = MODELS[name]
        model = build_model(spec)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"\n== {name}: {total / 1e6:.2f}M parameters, {trainable:,} meta-learned")
        for algorithm in args.algorithms:
            for steps in args.steps:
                results = run_case(model, spec, algorithm, steps, args.rows, args.repeats)
                print_table(name, algorithm, steps, results)


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed tensors go back to the OS
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    main()

"""Rebuilding learners from plain data: what a checkpoint's ``spec`` means.

A spec is JSON-ready data::

    {"benchmark": "sine", "algorithm": "maml",
     "model": {"class": "SineMLP", "kwargs": {...}},
     "learner": {"inner_lr": 0.01, ...},            # keyword arguments of the learner
     "modules": {"adaptation_loss": {"class": ..., "kwargs": {...}}}}   # optional

Learners are looked up by name in :data:`ALGORITHMS` and modules in :data:`MODELS`, so no
benchmark chooses a class by an if-chain.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from .._learner import MetaLearner
from ..algorithms import (
    ANIL,
    DAML,
    FOMAML,
    IMAML,
    MAML,
    JointTraining,
    MAMLPlusPlus,
    MetaSGD,
    Reptile,
)
from ._checkpoint import CheckpointError, check_learner_payload, load_checkpoint
from ._daml_loss import SeedLossNetwork

# Benchmark names of the learners; "transfer", "random" and "finetune" are baselines.
ALGORITHMS: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
    "metasgd": MetaSGD,
    "mamlpp": MAMLPlusPlus,
    "imaml": IMAML,
    "anil": ANIL,
    "daml": DAML,
    "transfer": JointTraining,
    "random": JointTraining,
    "finetune": JointTraining,  # digits: an ordinary classifier, fine-tuned with a new head
}

MODELS: dict[str, type[nn.Module]] = {
    "SineMLP": models.SineMLP,
    "Conv4": models.Conv4,
    "ResNet12": models.ResNet12,
    "SeedLossNetwork": SeedLossNetwork,
}


def parse_algorithms(
    text: str | list[str] | tuple[str, ...], allowed: tuple[str, ...]
) -> list[str]:
    """``"maml,fomaml"`` → ``["maml", "fomaml"]``, checked against ``allowed``."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        close = [difflib.get_close_matches(name, allowed, n=1) for name in unknown]
        hint = "".join(f" ({name!r}: did you mean {match[0]!r}?)"
                       for name, match in zip(unknown, close) if match)
        raise ValueError(
            f"--algorithms: unknown algorithm(s) {unknown or names!r}{hint}; choose from "
            f"{','.join(allowed)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--algorithms lists an algorithm twice: {names!r}")
    return names


def _tuples(values: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the constructors document."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def _module(module_spec: dict[str, Any]) -> nn.Module:
    if module_spec["class"] not in MODELS:
        raise ValueError(
            f"unknown model class {module_spec['class']!r}; known: {list(MODELS)}"
        )
    return MODELS[module_spec["class"]](**_tuples(module_spec.get("kwargs", {})))


def build_model(spec: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """The model named by ``spec["model"]`` (``{"class": ..., "kwargs": {...}}``).

    With ``seed``, the initial weights are drawn from ``torch.manual_seed(seed)``: every
    algorithm of a benchmark then starts from the same weights.
    """
    if seed is not None:
        torch.manual_seed(seed)
    return _module(spec["model"])


def build_learner(spec: dict[str, Any], *, seed: int | None = None) -> MetaLearner:
    """The learner named by ``spec["algorithm"]`` with ``spec["learner"]`` keyword arguments.

    The modules of ``spec["modules"]`` (such as DAML's ``adaptation_loss``) are built after
    the model, from the same random stream, and passed as keyword arguments.
    """
    algorithm = spec["algorithm"]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
    model = build_model(spec, seed=seed)
    kwargs: dict[str, Any] = _tuples(spec["learner"])
    kwargs.update({name: _module(module) for name, module in spec.get("modules", {}).items()})
    learner = ALGORITHMS[algorithm](model, **kwargs)
    # A resumed run must repeat the uninterrupted one bit for bit: one engine throughout.
    learner.engine_tuning = False
    return learner


def load_state(learner: MetaLearner, payload: dict[str, Any], path: Path | str) -> None:
    """Load a checkpoint's weights into ``learner``, or say why they do not fit."""
    try:
        learner.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, TypeError) as error:
        details = "; ".join(line.strip() for line in str(error).splitlines()[1:4] if line.strip())
        raise CheckpointError(
            f"{str(path)!r}: its weights do not fit the {payload['spec']['algorithm']!r} "
            f"learner its spec describes ({details or error}); the file was edited or written "
            f"by another fastmeta. Retrain it: delete it and run `fastmeta bench ... --resume`"
        ) from None


def load_learner(path: Path | str) -> tuple[MetaLearner, dict[str, Any]]:
    """The learner saved in a ``fastmeta bench`` checkpoint, with the checkpoint's contents.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: not a fastmeta checkpoint, or one whose entries do not agree
            (missing spec, a spec naming another algorithm, weights of another shape).
    """
    payload = load_checkpoint(path)
    check_learner_payload(path, payload)
    try:
        learner = build_learner(payload["spec"])
    except (ValueError, TypeError, KeyError) as error:
        raise CheckpointError(
            f"{str(path)!r}: its spec does not describe a learner this fastmeta builds "
            f"({error}); upgrade fastmeta, or retrain it"
        ) from None
    load_state(learner, payload, path)
    learner.meta_steps_taken = int(payload.get("iteration", 0))
    return learner, payload

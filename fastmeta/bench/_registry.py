"""Rebuilding learners from plain data: what a checkpoint's ``spec`` means."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import models
from .._learner import MetaLearner
from ..algorithms import ANIL, FOMAML, MAML, JointTraining, MetaSGD, Reptile
from ._checkpoint import load_checkpoint

# Benchmark names of the learners; "transfer" and "random" are the two baselines.
ALGORITHMS: dict[str, type[MetaLearner]] = {
    "maml": MAML,
    "fomaml": FOMAML,
    "reptile": Reptile,
    "metasgd": MetaSGD,
    "anil": ANIL,
    "transfer": JointTraining,
    "random": JointTraining,
    "finetune": JointTraining,  # digits: an ordinary classifier, fine-tuned with a new head
}

MODELS: dict[str, type[nn.Module]] = {
    "SineMLP": models.SineMLP,
    "Conv4": models.Conv4,
    "ResNet12": models.ResNet12,
}


def parse_algorithms(
    text: str | list[str] | tuple[str, ...], allowed: tuple[str, ...]
) -> list[str]:
    """``"maml,fomaml"`` → ``["maml", "fomaml"]``, checked against ``allowed``."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(
            f"--algorithms: unknown algorithm(s) {unknown or names!r}; choose from "
            f"{','.join(allowed)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"--algorithms lists an algorithm twice: {names!r}")
    return names


def build_model(spec: dict[str, Any], *, seed: int | None = None) -> nn.Module:
    """The model named by ``spec["model"]`` (``{"class": ..., "kwargs": {...}}``).

    With ``seed``, the initial weights are drawn from ``torch.manual_seed(seed)``: every
    algorithm of a benchmark then starts from the same weights.
    """
    model_spec = spec["model"]
    if model_spec["class"] not in MODELS:
        raise ValueError(f"unknown model class {model_spec['class']!r}; known: {list(MODELS)}")
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = dict(model_spec.get("kwargs", {}))
    if isinstance(kwargs.get("hidden"), list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return MODELS[model_spec["class"]](**kwargs)


def build_learner(spec: dict[str, Any], *, seed: int | None = None) -> MetaLearner:
    """The learner named by ``spec["algorithm"]`` with ``spec["learner"]`` keyword arguments."""
    algorithm = spec["algorithm"]
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {list(ALGORITHMS)}")
    return ALGORITHMS[algorithm](build_model(spec, seed=seed), **spec["learner"])


def load_learner(path: Path | str) -> tuple[MetaLearner, dict[str, Any]]:
    """The learner saved in a ``fastmeta bench`` checkpoint, with the checkpoint's contents."""
    payload = load_checkpoint(path)
    learner = build_learner(payload["spec"])
    learner.load_state_dict(payload["state_dict"])
    learner.meta_steps_taken = int(payload.get("iteration", 0))
    return learner, payload

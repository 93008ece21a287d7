"""Engines: how a learner's inner loop is run and differentiated."""

from __future__ import annotations

from ._base import Engine, InnerLoop, InnerLoopOutput, MetaGrad
from ._higher import DifferentiableAdam, DifferentiableAdamW, HigherEngine

ENGINES = ("auto", "higher")


def resolve_engine(engine: str) -> Engine:
    """The engine named ``engine`` (``"auto"`` picks the best available one)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {list(ENGINES)}")
    return HigherEngine()


__all__ = [
    "ENGINES",
    "DifferentiableAdam",
    "DifferentiableAdamW",
    "Engine",
    "HigherEngine",
    "InnerLoop",
    "InnerLoopOutput",
    "MetaGrad",
    "resolve_engine",
]

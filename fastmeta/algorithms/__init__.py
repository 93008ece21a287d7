"""The meta-learning algorithms, one per file."""

from __future__ import annotations

from .anil import ANIL
from .daml import DAML
from .imaml import IMAML
from .joint import JointTraining
from .maml import FOMAML, MAML
from .maml_plus_plus import MAMLPlusPlus
from .meta_sgd import MetaSGD
from .reptile import Reptile

__all__ = [
    "ANIL", "DAML", "FOMAML", "IMAML", "JointTraining", "MAML", "MAMLPlusPlus", "MetaSGD",
    "Reptile",
]

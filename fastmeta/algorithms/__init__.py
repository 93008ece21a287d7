"""The meta-learning algorithms, one per file."""

from __future__ import annotations

from ._keywords import explain_unknown_keywords
from .anil import ANIL
from .daml import DAML
from .imaml import IMAML
from .joint import JointTraining
from .maml import FOMAML, MAML
from .maml_plus_plus import MAMLPlusPlus
from .meta_sgd import MetaSGD
from .reptile import Reptile

for _algorithm in (ANIL, DAML, FOMAML, IMAML, JointTraining, MAML, MAMLPlusPlus, MetaSGD,
                   Reptile):
    explain_unknown_keywords(_algorithm)

__all__ = [
    "ANIL", "DAML", "FOMAML", "IMAML", "JointTraining", "MAML", "MAMLPlusPlus", "MetaSGD",
    "Reptile",
]

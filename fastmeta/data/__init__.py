"""Task data for meta-learning: torchmeta's protocol, the sine family, few-shot classification,
and the few-shot vision suite (Omniglot, MiniImagenet, CIFARFS, FC100).

A batch from ``BatchMetaDataLoader`` is what every fastmeta learner's
``meta_step`` takes: an ``OrderedDict`` with ``"train"``/``"test"`` (or
``"support"``/``"query"``), each ``[inputs, targets]`` of shape
``[batch, shots, ...]``.

Example:
    >>> from fastmeta.data import BatchMetaDataLoader, sinusoid
    >>> loader = BatchMetaDataLoader(sinusoid(10, seed=0), batch_size=25)
    >>> batch = next(iter(loader))
    >>> list(batch), batch["train"][0].shape
    (['train', 'test'], torch.Size([25, 10, 1]))
"""

from __future__ import annotations

from fastmeta.data._classification import (
    ClassTask,
    FewShotDataset,
    FewShotImageFolder,
    ImageFolderDataset,
    LabelledClassDataset,
)
from fastmeta.data._digits import Digits
from fastmeta.data._domain_shift import DomainShiftSinusoid, UnlabelledTask
from fastmeta.data._hf import HFFewShotDataset, HFInputs, hf_few_shot
from fastmeta.data._images import ImageArrayDataset
from fastmeta.data._loaders import (
    BatchMetaCollate,
    BatchMetaDataLoader,
    CombinationRandomSampler,
    CombinationSequentialSampler,
    MetaDataLoader,
    no_collate,
)
from fastmeta.data._protocol import (
    ClassDataset,
    CombinationMetaDataset,
    ConcatTask,
    MetaDataset,
    SubsetTask,
    Task,
)
from fastmeta.data._splitters import ClassSplitter
from fastmeta.data._toy import (
    SINUSOID_PRESETS,
    Harmonic,
    HarmonicTask,
    LinearTask,
    RegressionTask,
    Sinusoid,
    SinusoidAndLine,
    SinusoidTask,
    sinusoid,
)
from fastmeta.data._transforms import Categorical, Rotation
from fastmeta.data._vision import CIFARFS, FC100, MiniImagenet, Omniglot

__all__ = [
    "CIFARFS",
    "FC100",
    "SINUSOID_PRESETS",
    "BatchMetaCollate",
    "BatchMetaDataLoader",
    "Categorical",
    "ClassDataset",
    "ClassSplitter",
    "ClassTask",
    "CombinationMetaDataset",
    "CombinationRandomSampler",
    "CombinationSequentialSampler",
    "ConcatTask",
    "Digits",
    "DomainShiftSinusoid",
    "FewShotDataset",
    "FewShotImageFolder",
    "HFFewShotDataset",
    "HFInputs",
    "Harmonic",
    "HarmonicTask",
    "ImageArrayDataset",
    "ImageFolderDataset",
    "LabelledClassDataset",
    "LinearTask",
    "MetaDataLoader",
    "MetaDataset",
    "MiniImagenet",
    "Omniglot",
    "RegressionTask",
    "Rotation",
    "Sinusoid",
    "SinusoidAndLine",
    "SinusoidTask",
    "SubsetTask",
    "Task",
    "UnlabelledTask",
    "hf_few_shot",
    "no_collate",
    "sinusoid",
]

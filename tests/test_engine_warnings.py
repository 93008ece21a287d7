"""The vectorised engine does not repeat torch's notice about vmap's per-example fallback."""

from __future__ import annotations

import warnings

import torch
from torch import nn

import fastmeta


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).mean(1)


def test_adapt_and_meta_step_on_a_transformer_encoder_print_no_fallback_notice():
    torch.manual_seed(0)
    learner = fastmeta.MAML(_Encoder(), inner_lr=0.01, inner_steps=2, engine="vmap")
    x, y = torch.randn(4, 5, 8), torch.randn(4, 1)
    task = fastmeta.TaskBatch(x.expand(2, -1, -1, -1), y.expand(2, -1, -1),
                              x.expand(2, -1, -1, -1), y.expand(2, -1, -1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.adapt(x, y)
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.01))
    notices = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    assert not notices, notices


def test_torchs_fallback_notice_is_off_inside_the_engine_and_back_on_after():
    from tests.conftest import make_task

    class Renormed(torch.nn.Module):  # torch.renorm has no batching rule: vmap falls back
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(1, 4)
            self.head = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.renorm(self.linear(x), 2, 0, 1.0))

    learner = fastmeta.MAML(Renormed(), inner_lr=0.1, engine="vmap", loss_fn="mse")
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        learner.meta_step(make_task(tasks=2), optimizer)
        learner.adapt_many(make_task(tasks=2))
    assert not [w for w in seen if "performance drop" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:  # the user's own vmap: as torch does
        warnings.simplefilter("always")
        torch.func.vmap(lambda a: torch.renorm(a, 2, 0, 1.0))(torch.randn(3, 5, 4))
    assert [w for w in seen if "performance drop" in str(w.message)]

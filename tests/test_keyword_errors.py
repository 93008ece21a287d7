"""A misspelt constructor keyword names the class, the value and fastmeta's spelling."""

from __future__ import annotations

import pytest
from torch import nn

import fastmeta.algorithms

CLASSES = [getattr(fastmeta.algorithms, name) for name in fastmeta.algorithms.__all__]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_loss_instead_of_loss_fn_says_loss_fn(cls):
    with pytest.raises(TypeError, match=rf"^{cls.__name__} got an unexpected keyword argument "
                                        r"loss='mse'; did you mean loss_fn='mse'\?$"):
        cls(nn.Linear(1, 1), inner_lr=0.1, loss="mse")


def test_lr_instead_of_inner_lr_and_an_unknown_keyword():
    with pytest.raises(TypeError, match=r"lr=0\.1; did you mean inner_lr=0\.1\?"):
        fastmeta.MAML(nn.Linear(1, 1), lr=0.1)
    with pytest.raises(TypeError, match=r"MAML got an unexpected keyword argument bogus=1; it "
                                        r"takes model, inner_lr, inner_steps, first_order"):
        fastmeta.MAML(nn.Linear(1, 1), inner_lr=0.1, bogus=1)


def test_the_signature_is_still_the_algorithm_s_own():
    import inspect

    assert "loss_fn" in inspect.signature(fastmeta.MAML).parameters

"""Graph networks no one here wrote: PyTorch Geometric layers taking ``(x, edge_index)``.

One graph per task (node classification): ``x`` ``[tasks, nodes, features]``, ``edge_index``
``[tasks, 2, edges]`` as per-task context. Meta-gradients equal the per-task reference of
``tests/test_structured.py`` in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import fastmeta
from tests.test_structured import _assert_equal, _graphs, _meta_gradient, reference

geometric = pytest.importorskip("torch_geometric.nn")


class Network(nn.Module):
    def __init__(self, conv: type[nn.Module]) -> None:
        super().__init__()
        self.conv, self.head = conv(3, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x, edge_index)))


def _build(conv: str) -> nn.Module:
    torch.manual_seed(0)
    return Network(getattr(geometric, conv)).double()


# GCNConv adds self-loops with boolean-mask indexing, which torch.func cannot vectorise:
# "vmap" refuses it and "auto" takes "higher", saying why.
CASES = [("SAGEConv", "vmap"), ("SAGEConv", "higher"), ("SAGEConv", "auto"),
         ("GCNConv", "higher"), ("GCNConv", "auto")]


@pytest.mark.parametrize("conv,engine", CASES, ids=["-".join(c) for c in CASES])
def test_meta_gradient_of_a_graph_network_equals_the_reference(conv, engine):
    batch = _graphs()
    expected = reference(_build(conv), batch, "cross_entropy")
    learner = fastmeta.MAML(_build(conv), inner_lr=0.1, inner_steps=2,
                            loss_fn="cross_entropy", engine=engine)
    if conv == "GCNConv" and engine == "auto":
        with pytest.warns(UserWarning, match="engine='auto' uses the 'higher' engine.*boolean"):
            actual = _meta_gradient(learner, batch)
        assert learner.engine == "higher"
    else:
        actual = _meta_gradient(learner, batch)
        assert learner.engine == ("higher" if engine == "higher" else "vmap")
    _assert_equal(actual, expected)


def test_a_graph_network_refused_by_vmap_says_why():
    learner = fastmeta.MAML(_build("GCNConv"), inner_lr=0.1, loss_fn="cross_entropy",
                            engine="vmap")
    with pytest.raises(RuntimeError, match="vmap.*boolean mask"):
        _meta_gradient(learner, _graphs())

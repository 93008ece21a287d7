"""A zoo of small models, one per layer family of ``torch.nn``, and an independent reference.

Each entry builds a float64 model around one layer family and draws task batches for it.
The reference (:func:`reference_meta_gradient`) is written here from first principles, task
by task (``functional_call`` + ``torch.autograd.grad``), sharing no code with fastmeta's
engines, so that every engine can be checked against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils import parametrizations

import fastmeta

Inputs = Callable[[torch.Generator, int, int], Tensor]  # (generator, tasks, shots) -> x


@dataclass(frozen=True)
class Entry:
    """One zoo model: how to build it, draw its inputs and score it.

    Attributes:
        build: a fresh float64 model (seeded).
        inputs: ``[tasks, shots, ...]`` inputs.
        classes: number of classes for cross-entropy, or 0 for a scalar MSE regression.
        vmap: ``None`` where the vectorised engine is exact, else a regex of its refusal.
        higher: likewise for the higher engine.
    """

    build: Callable[[], nn.Module]
    inputs: Inputs
    classes: int = 0
    vmap: str | None = None
    higher: str | None = None


def _randn(*shape: int) -> Inputs:
    return lambda g, tasks, shots: torch.randn(tasks, shots, *shape, generator=g,
                                               dtype=torch.float64)


def _tokens(vocab: int, length: int) -> Inputs:
    """Token ids with padding (id 0) at the end of every sequence."""

    def draw(g: torch.Generator, tasks: int, shots: int) -> Tensor:
        ids = torch.randint(1, vocab, (tasks, shots, length), generator=g)
        ids[..., length - 2:] = 0
        return ids

    return draw


def _seq(*layers: nn.Module) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[_fresh(layer) for layer in layers]).double()

    return build


def _fresh(layer: nn.Module) -> nn.Module:
    """A re-initialised deep copy (so each build draws the same weights after seeding)."""
    import copy

    layer = copy.deepcopy(layer)
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return layer


def _module(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory().double()

    return build


class _Head(nn.Module):
    """``body`` then a mean over the sequence (if any) and a linear head."""

    def __init__(self, body: nn.Module, width: int, out: int = 1, pool: bool = True) -> None:
        super().__init__()
        self.body, self.pool = body, pool
        self.head = nn.Linear(width, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if isinstance(h, tuple):  # RNNs: (output, state)
            h = h[0]
        if self.pool and h.dim() == 3:
            h = h.mean(1)
        return self.head(torch.tanh(h))


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bilinear(x, x.flip(-1))))


class _Attention(nn.Module):
    """Self-attention with a key padding mask and a causal mask."""

    def __init__(self, need_weights: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.need_weights = need_weights
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        padding = torch.zeros(x.shape[0], length, dtype=torch.bool)
        padding[:, -1] = True
        h, _ = self.attention(x, x, x, key_padding_mask=padding, attn_mask=causal,
                              need_weights=self.need_weights)
        return self.head(torch.tanh(h[:, 0]))


class _Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(6, 2, dim_feedforward=8, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x, x.flip(1)).mean(1))


class _Cell(nn.Module):
    """A recurrent cell unrolled over the sequence."""

    def __init__(self, cell: type[nn.RNNCellBase]) -> None:
        super().__init__()
        self.cell = cell(3, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        state: Tensor | tuple[Tensor, Tensor] | None = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if isinstance(state, tuple) else state
        assert h is not None
        return self.head(h)


class _Tied(nn.Module):
    """Two modules holding one weight, and one module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight
        self.shared = nn.Linear(3, 3, bias=False)
        self.head = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.decoder(torch.tanh(self.encoder(x))))
        return self.head(self.shared(torch.tanh(self.shared(h))))


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.body.weight.requires_grad_(False)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class _Buffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 4))
        self.register_buffer("shift", torch.zeros(4), persistent=False)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x) * self.scale + self.shift))


class _PrototypeHead(nn.Module):
    """A prototypical-network-style metric head: class scores are minus the Euclidean
    distances (``torch.cdist``) from the embedded input to learned class prototypes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.prototypes = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return -torch.cdist(torch.tanh(self.body(x)), self.prototypes)


def _batchnorm(dims: int, *, train: bool, track: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        if dims == 1:
            model: nn.Module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(
                4, track_running_stats=track), nn.Tanh(), nn.Linear(4, 1))
        else:
            model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(
                2, track_running_stats=track), nn.Tanh(), nn.Flatten(), nn.Linear(18, 1))
        model = model.double()
        norm = model[1]
        if track:  # non-trivial statistics, so eval mode differs from batch statistics
            assert norm.running_mean is not None and norm.running_var is not None
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return model.train(train)

    return build


def _instancenorm(dims: int, track: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        conv = nn.Conv1d(2, 3, 3) if dims == 1 else nn.Conv2d(1, 3, 3)
        norm_cls = nn.InstanceNorm1d if dims == 1 else nn.InstanceNorm2d
        norm = norm_cls(3, affine=True, track_running_stats=track)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        width = 3 * 4 if dims == 1 else 3 * 9
        return nn.Sequential(conv, norm, nn.SiLU(), nn.Flatten(), nn.Linear(width, 1)).double()

    return build


def _parametrized(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.Linear(4, 4)
        if kind == "weight_norm":
            parametrizations.weight_norm(layer)
        else:
            parametrizations.orthogonal(layer)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), layer, nn.Tanh(),
                             nn.Linear(4, 1)).double()

    return build


_RNN_REFUSED = r"submodule 'body' is a \w+, which torch.func cannot vectorise"
_CELL_REFUSED = r"submodule 'cell' is a \w+Cell, which torch.func cannot vectorise"
_MAX_NORM_REFUSED = r"submodule 'body' is a Embedding with max_norm=1.0, which rewrites"

ZOO: dict[str, Entry] = {
    "Linear": Entry(_seq(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), _randn(3)),
    "Bilinear": Entry(_module(_Bilinear), _randn(3)),
    "Conv1d": Entry(_seq(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)),
                    _randn(2, 6)),
    "Conv2d": Entry(_seq(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(32, 1)), _randn(1, 4, 4)),
    "Conv3d": Entry(_seq(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 1)),
                    _randn(1, 3, 3, 3)),
    "ConvTranspose1d": Entry(_seq(nn.ConvTranspose1d(2, 2, 3, stride=2), nn.Tanh(),
                                  nn.Flatten(), nn.Linear(18, 1)), _randn(2, 4)),
    "ConvTranspose2d": Entry(_seq(nn.ConvTranspose2d(1, 2, 2, stride=2), nn.Tanh(),
                                  nn.Flatten(), nn.Linear(32, 1)), _randn(1, 2, 2)),
    "BatchNorm1d-train": Entry(_batchnorm(1, train=True, track=True), _randn(3)),
    "BatchNorm1d-eval": Entry(_batchnorm(1, train=False, track=True), _randn(3)),
    "BatchNorm1d-no-stats": Entry(_batchnorm(1, train=True, track=False), _randn(3)),
    "BatchNorm2d-train": Entry(_batchnorm(2, train=True, track=True), _randn(1, 5, 5)),
    "BatchNorm2d-eval": Entry(_batchnorm(2, train=False, track=True), _randn(1, 5, 5)),
    "BatchNorm2d-no-stats-eval": Entry(_batchnorm(2, train=False, track=False),
                                       _randn(1, 5, 5)),
    "InstanceNorm1d": Entry(_instancenorm(1), _randn(2, 6)),
    "InstanceNorm2d": Entry(_instancenorm(2), _randn(1, 5, 5)),
    "InstanceNorm1d-running-stats": Entry(_instancenorm(1, track=True), _randn(2, 6)),
    "LayerNorm": Entry(_seq(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 1)),
                       _randn(3)),
    "GroupNorm": Entry(_seq(nn.Conv1d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                            nn.Linear(16, 1)), _randn(2, 6)),
    "RMSNorm": Entry(_seq(nn.Linear(3, 5), nn.RMSNorm(5), nn.GELU(), nn.Linear(5, 1)),
                     _randn(3)),
    "LocalResponseNorm": Entry(_seq(nn.Conv1d(2, 4, 3), nn.LocalResponseNorm(2), nn.Tanh(),
                                    nn.Flatten(), nn.Linear(16, 1)), _randn(2, 6)),
    "Embedding-padding_idx": Entry(_module(lambda: _Head(nn.Embedding(12, 6, padding_idx=0),
                                                         6, out=3)), _tokens(12, 5), classes=3),
    "Embedding-max_norm": Entry(_module(lambda: _Head(nn.Embedding(12, 6, max_norm=1.0), 6,
                                                      out=3)), _tokens(12, 5), classes=3,
                                vmap=_MAX_NORM_REFUSED, higher=_MAX_NORM_REFUSED),
    "EmbeddingBag": Entry(_module(lambda: _Head(nn.EmbeddingBag(12, 6, mode="mean",
                                                                padding_idx=0), 6, out=3)),
                          _tokens(12, 5), classes=3),
    "MultiheadAttention": Entry(_module(lambda: _Attention(need_weights=True)), _randn(4, 6)),
    "MultiheadAttention-sdpa": Entry(_module(lambda: _Attention(need_weights=False)),
                                     _randn(4, 6)),
    "TransformerEncoderLayer": Entry(_module(lambda: _Head(nn.TransformerEncoderLayer(
        6, 2, dim_feedforward=8, dropout=0.0, batch_first=True), 6)), _randn(4, 6)),
    "TransformerDecoderLayer": Entry(_module(_Decoder), _randn(4, 6)),
    "RNN": Entry(_module(lambda: _Head(nn.RNN(3, 4, batch_first=True), 4)), _randn(4, 3),
                 vmap=_RNN_REFUSED),
    "LSTM": Entry(_module(lambda: _Head(nn.LSTM(3, 4, batch_first=True), 4)), _randn(4, 3),
                  vmap=_RNN_REFUSED),
    "GRU": Entry(_module(lambda: _Head(nn.GRU(3, 4, batch_first=True), 4)), _randn(4, 3),
                 vmap=_RNN_REFUSED),
    "RNNCell": Entry(_module(lambda: _Cell(nn.RNNCell)), _randn(3, 3), vmap=_CELL_REFUSED),
    "LSTMCell": Entry(_module(lambda: _Cell(nn.LSTMCell)), _randn(3, 3), vmap=_CELL_REFUSED),
    "GRUCell": Entry(_module(lambda: _Cell(nn.GRUCell)), _randn(3, 3), vmap=_CELL_REFUSED),
    "PReLU": Entry(_seq(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 1)), _randn(3)),
    "activations": Entry(_seq(nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 6),
                              nn.GELU(), nn.Linear(6, 6), nn.SiLU(), nn.Softplus(),
                              nn.ELU(), nn.Mish(), nn.LeakyReLU(0.1), nn.Hardswish(),
                              nn.Sigmoid(), nn.Linear(6, 1)), _randn(3)),
    "Dropout-eval": Entry(lambda: _seq(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(0.5),
                                       nn.Linear(4, 1))().eval(), _randn(3)),
    "pooling": Entry(_seq(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                          nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(3, 1)), _randn(1, 6, 6)),
    "Upsample-PixelShuffle": Entry(_seq(nn.Conv2d(1, 4, 1), nn.Tanh(),
                                        nn.Upsample(scale_factor=2, mode="bilinear"),
                                        nn.PixelShuffle(2), nn.Flatten(), nn.Linear(64, 1)),
                                   _randn(1, 2, 2)),
    "Flatten-Unflatten": Entry(_seq(nn.Flatten(), nn.Linear(6, 6), nn.Unflatten(1, (2, 3)),
                                    nn.Tanh(), nn.Flatten(), nn.Linear(6, 1)), _randn(2, 3)),
    "weight_norm": Entry(_parametrized("weight_norm"), _randn(3)),
    "orthogonal": Entry(_parametrized("orthogonal"), _randn(3)),
    "tied-weights": Entry(_module(_Tied), _randn(3)),
    "frozen-weights": Entry(_module(_Frozen), _randn(3)),
    "buffers": Entry(_module(_Buffers), _randn(3)),
    "cdist-prototypes": Entry(_module(_PrototypeHead), _randn(3), classes=3),
}


def draw_task(entry: Entry, *, tasks: int = 2, shots: int = 3, query: int = 3,
              seed: int = 0) -> fastmeta.TaskBatch:
    """A float64 task batch for ``entry``: MSE targets or class labels."""
    g = torch.Generator().manual_seed(seed)

    def targets(n: int) -> Tensor:
        if entry.classes:
            return torch.randint(0, entry.classes, (tasks, n), generator=g)
        return torch.randn(tasks, n, 1, generator=g, dtype=torch.float64)

    support_x, query_x = entry.inputs(g, tasks, shots), entry.inputs(g, tasks, query)
    return fastmeta.TaskBatch(support_x, targets(shots), query_x, targets(query))


def loss_of(entry: Entry) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if entry.classes else F.mse_loss


def reference_meta_gradient(
    model: nn.Module,
    task: fastmeta.TaskBatch,
    *,
    algorithm: str,
    inner_lr: float,
    steps: int,
    loss: Callable[[Tensor, Tensor], Tensor],
    lrs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Meta-loss and meta-gradient (keyed like ``named_parameters()``), task by task.

    ``algorithm``: ``"maml"`` (second order), ``"fomaml"``, ``"reptile"`` (``θ − mean φ``)
    or ``"metasgd"`` (second order with the per-parameter rates ``lrs``; their gradients
    come back under ``"lr:" + name``).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    second_order = algorithm in ("maml", "metasgd")
    wrt = list(params.values()) + (list(lrs.values()) if lrs else [])
    total = torch.zeros((), dtype=torch.float64)
    grads = [torch.zeros_like(w) for w in wrt]
    tasks = task.num_tasks
    for t in range(tasks):
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        fast = dict(params)
        for _ in range(steps):
            out = functional_call(model, {**fast, **buffers}, (task.support_x[t],))
            inner = loss(out, task.support_y[t])
            step_grads = torch.autograd.grad(inner, list(fast.values()),
                                             create_graph=second_order)
            fast = {n: p - (lrs[n] if lrs else inner_lr) * (g if second_order else g.detach())
                    for (n, p), g in zip(fast.items(), step_grads)}
        if algorithm == "reptile":
            for i, (n, p) in enumerate(params.items()):
                grads[i] += (p - fast[n]).detach() / tasks
            continue
        out = functional_call(model, {**fast, **buffers}, (task.query_x[t],))
        query_loss = loss(out, task.query_y[t]) / tasks
        total = total + query_loss.detach()
        if algorithm == "fomaml":
            task_grads = torch.autograd.grad(query_loss, list(fast.values()))
        else:
            task_grads = torch.autograd.grad(query_loss, wrt, allow_unused=True)
        for i, g in enumerate(task_grads):
            if g is not None:
                grads[i] += g
    names = list(params) + ([f"lr:{n}" for n in lrs] if lrs else [])
    return total, dict(zip(names, grads))


def finite_difference_check(
    model: nn.Module,
    task: fastmeta.TaskBatch,
    gradient: dict[str, Tensor],
    meta_loss: Callable[[], Tensor],
    *,
    per_parameter: int = 2,
    eps: float = 1e-6,
) -> float:
    """Worst relative error of ``gradient`` against central differences of ``meta_loss``.

    A few elements per model parameter, chosen deterministically; gradients near zero are
    judged by their absolute error.
    """
    worst = 0.0
    g = torch.Generator().manual_seed(1)
    scale = max(float(v.abs().max()) for v in gradient.values())
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        flat = param.data.view(-1)
        for element in torch.randperm(flat.numel(), generator=g)[:per_parameter].tolist():
            original = float(flat[element])
            flat[element] = original + eps
            plus = float(meta_loss())
            flat[element] = original - eps
            minus = float(meta_loss())
            flat[element] = original
            numeric = (plus - minus) / (2 * eps)
            exact = float(gradient[name].reshape(-1)[element])
            worst = max(worst, abs(numeric - exact) / max(abs(numeric), abs(exact),
                                                          1e-3 * scale))
    return worst

"""Models as they are: several inputs, keyword inputs, structured outputs, chosen parameters.

Every meta-gradient is checked in float64 against a per-task reference written here from
``functional_call`` and ``torch.autograd.grad`` alone, on every engine.
"""

from __future__ import annotations

import collections
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fastmeta

ENGINES = ("vmap", "loop", "higher", "auto")
INNER_LR, STEPS, TASKS, SHOTS = 0.1, 2, 3, 4


class TwoInputs(nn.Module):
    """``forward(x, z)`` -> ``(prediction, hidden)``: a regression from two inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(2, 5), nn.Linear(5, 1)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.a(x) + self.b(z))
        return self.head(h), h


class Tokens(nn.Module):
    """``forward(input_ids=..., attention_mask=...)`` -> ``{"logits": ..., "pooled": ...}``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (torch.tanh(self.body(self.embed(input_ids))) * mask).sum(-2) / mask.sum(-2)
        return {"logits": self.head(pooled), "pooled": pooled}


class Nested(nn.Module):
    """``forward(pair=(x1, x2), extra=x3)`` -> a tensor; a buffer scales the features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(2, 4), nn.Linear(3, 4), nn.Linear(4, 1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4))

    def forward(self, pair: tuple[Tensor, Tensor], extra: Tensor) -> Tensor:
        return self.head(torch.tanh((self.a(pair[0]) * extra + self.b(pair[1])) * self.scale))


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().double()


def _draw(kind: str, seed: int = 0) -> dict[str, list[Any]]:
    g = torch.Generator().manual_seed(seed)

    def part(shots: int) -> list[Any]:
        if kind == "tuple":
            x = (torch.randn(TASKS, shots, 3, generator=g, dtype=torch.float64),
                 torch.randn(TASKS, shots, 2, generator=g, dtype=torch.float64))
            return [x, torch.randn(TASKS, shots, 1, generator=g, dtype=torch.float64)]
        if kind == "mapping":
            ids = torch.randint(1, 11, (TASKS, shots, 5), generator=g)
            mask = torch.ones_like(ids)
            mask[..., 3:] = 0
            return [{"input_ids": ids, "attention_mask": mask},
                    torch.randint(0, 3, (TASKS, shots), generator=g)]
        x = {"pair": (torch.randn(TASKS, shots, 2, generator=g, dtype=torch.float64),
                      torch.randn(TASKS, shots, 3, generator=g, dtype=torch.float64)),
             "extra": torch.rand(TASKS, shots, 1, generator=g, dtype=torch.float64)}
        return [x, torch.randn(TASKS, shots, 1, generator=g, dtype=torch.float64)]

    return {"train": part(SHOTS), "test": part(SHOTS + 1)}


CASES = {"tuple": (TwoInputs, "mse"), "mapping": (Tokens, "cross_entropy"),
         "nested": (Nested, "mse")}


def _take(tree: Any, t: int) -> Any:
    if isinstance(tree, dict):
        return {k: _take(v, t) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_take(v, t) for v in tree)
    return tree[t]


def _run(model: nn.Module, state: dict[str, Tensor], x: Any) -> Any:
    if isinstance(x, dict):
        return functional_call(model, state, (), x)
    if isinstance(x, tuple):
        return functional_call(model, state, x)
    return functional_call(model, state, (x,))


def _prediction(output: Any) -> Tensor:
    if isinstance(output, tuple):
        return output[0]
    if isinstance(output, dict):
        return output["logits"]
    return output


def reference(model: nn.Module, batch: dict[str, list[Any]], loss: str, *,
              adapted: tuple[str, ...] | None = None, first_order: bool = False
              ) -> dict[str, Tensor]:
    """The MAML meta-gradient, task by task, adapting ``adapted`` (default: all)."""
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = tuple(params) if adapted is None else adapted
    buffers = dict(model.named_buffers())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    (sx, sy), (qx, qy) = batch["train"], batch["test"]
    for t in range(TASKS):
        fast = dict(params)
        for _ in range(STEPS):
            inner = loss_fn(_prediction(_run(model, {**fast, **buffers}, _take(sx, t))), sy[t])
            g = torch.autograd.grad(inner, [fast[n] for n in names],
                                    create_graph=not first_order)
            fast.update({n: fast[n] - INNER_LR * (gi.detach() if first_order else gi)
                         for n, gi in zip(names, g)})
        outer = loss_fn(_prediction(_run(model, {**fast, **buffers}, _take(qx, t))), qy[t])
        wrt = [fast[n] for n in names] if first_order else list(params.values())
        keys = names if first_order else tuple(params)
        for n, g in zip(keys, torch.autograd.grad(outer / TASKS, wrt, allow_unused=True)):
            if g is not None:
                grads[n] += g
    return grads


def _meta_gradient(learner: fastmeta.MetaLearner, batch: Any) -> dict[str, Tensor]:
    learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=0.0))
    return {n: p.grad if p.grad is not None else torch.zeros_like(p)
            for n, p in learner.module.named_parameters() if p.requires_grad}


def _assert_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 0
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=1e-9, atol=1e-10 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("first_order", [False, True], ids=["maml", "fomaml"])
def test_meta_gradient_of_structured_inputs_and_outputs(kind, engine, first_order):
    cls, loss = CASES[kind]
    learner = fastmeta.MAML(_build(cls), inner_lr=INNER_LR, inner_steps=STEPS, loss_fn=loss,
                            engine=engine, first_order=first_order)
    batch = _draw(kind)
    expected = reference(_build(cls), batch, loss, first_order=first_order)
    _assert_equal(_meta_gradient(learner, batch), expected)
    if engine == "auto":
        assert learner.engine == "vmap"


@pytest.mark.parametrize("engine", ENGINES)
def test_adapt_on_keyword_inputs_is_pure_and_matches_adapt_many(engine):
    model = _build(Tokens)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    learner = fastmeta.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS,
                            loss_fn="cross_entropy", engine=engine)
    batch = _draw("mapping")
    (sx, sy), (qx, _) = batch["train"], batch["test"]
    many = learner.adapt_many(batch)
    outputs = many(qx)
    assert isinstance(outputs, dict) and set(outputs) == {"logits", "pooled"}
    assert outputs["logits"].shape == (TASKS, SHOTS + 1, 3)
    one = learner.adapt(_take(sx, 1), sy[1])
    single = one(**_take(qx, 1))
    torch.testing.assert_close(single["logits"], outputs["logits"][1], rtol=1e-10, atol=1e-12)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_adapt_many_outputs_keep_their_structure_with_buffers(engine):
    learner = fastmeta.MAML(_build(TwoInputs), inner_lr=INNER_LR, engine=engine)
    learner.module.register_buffer("unused", torch.zeros(2, dtype=torch.float64))
    batch = _draw("tuple")
    outputs = learner.adapt_many(batch)(batch["test"][0])
    assert isinstance(outputs, tuple) and len(outputs) == 2
    assert outputs[0].shape == (TASKS, SHOTS + 1, 1) and outputs[1].shape == (TASKS, SHOTS + 1, 5)


def test_model_output_of_hugging_face_is_read_and_stacked():
    transformers = pytest.importorskip("transformers")

    class Classifier(Tokens):
        def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
            out = super().forward(input_ids, attention_mask)
            return transformers.modeling_outputs.SequenceClassifierOutput(
                logits=out["logits"], hidden_states=(out["pooled"],))

    batch = _draw("mapping")
    expected = reference(_build(Tokens), batch, "cross_entropy")
    for engine in ENGINES:
        learner = fastmeta.MAML(_build(Classifier), inner_lr=INNER_LR, inner_steps=STEPS,
                                loss_fn="cross_entropy", engine=engine)
        _assert_equal(_meta_gradient(learner, batch), expected)
    outputs = learner.adapt_many(batch)(batch["test"][0])
    assert type(outputs).__name__ == "SequenceClassifierOutput"
    assert outputs.logits.shape == (TASKS, SHOTS + 1, 3)


def test_output_fn_picks_the_prediction():
    batch = _draw("tuple")
    expected = reference(_build(TwoInputs), batch, "mse")
    loss = fastmeta.Loss("mse", output_fn=lambda out: out[0])
    learner = fastmeta.MAML(_build(TwoInputs), inner_lr=INNER_LR, inner_steps=STEPS,
                            loss_fn=loss, engine="vmap")
    _assert_equal(_meta_gradient(learner, batch), expected)


def test_an_output_without_a_prediction_names_output_fn():
    class Odd(TwoInputs):
        def forward(self, x: Tensor, z: Tensor) -> Any:  # type: ignore[override]
            return {"prediction": super().forward(x, z)[0]}

    learner = fastmeta.MAML(_build(Odd), inner_lr=INNER_LR, engine="vmap")
    with pytest.raises(TypeError, match=r"keys \['prediction'\].*output_fn=lambda out"):
        learner.meta_step(_draw("tuple"), torch.optim.SGD(learner.parameters(), lr=0.0))
    with pytest.raises(TypeError, match="output_fn must be callable"):
        fastmeta.Loss("mse", output_fn=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'; choose one of"):
        fastmeta.Loss("hinge")


# ---------------------------------------------------------------------------- selection


def test_selection_by_name_glob_module_and_predicate():
    model = _build(TwoInputs)
    select = fastmeta.select_parameters
    assert select(model, "head.weight") == ("head.weight",)
    assert select(model, "head") == ("head.weight", "head.bias")
    assert select(model, "*.bias") == ("a.bias", "b.bias", "head.bias")
    assert select(model, model.b) == ("b.weight", "b.bias")
    assert select(model, model.a.weight) == ("a.weight",)
    assert select(model, lambda name, p: p.dim() == 2) == ("a.weight", "b.weight",
                                                           "head.weight")
    assert select(model, ["head", "a.bias"]) == ("a.bias", "head.weight", "head.bias")
    learner = fastmeta.MAML(model, inner_lr=INNER_LR, adapt="*.bias")
    assert learner.adapted_names() == ("a.bias", "b.bias", "head.bias")


def test_selection_errors():
    model = _build(TwoInputs)
    with pytest.raises(ValueError, match=r"adapt='decoder\.\*' matches no parameter.*'a.weight'"):
        fastmeta.MAML(model, inner_lr=INNER_LR, adapt="decoder.*")
    with pytest.raises(ValueError, match="not a submodule of the model"):
        fastmeta.MAML(model, inner_lr=INNER_LR, adapt=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        fastmeta.MAML(model, inner_lr=INNER_LR, adapt=nn.Parameter(torch.zeros(2)))
    with pytest.raises(TypeError, match="adapt must be a parameter or submodule name"):
        fastmeta.MAML(model, inner_lr=INNER_LR, adapt=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"adapt=\[\] selects nothing"):
        fastmeta.MAML(model, inner_lr=INNER_LR, adapt=[])
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="selects only parameters with requires_grad=False"):
        fastmeta.MAML(model, inner_lr=INNER_LR, adapt="head")
    with pytest.raises(ValueError, match="exactly one of head= .* and adapt="):
        fastmeta.ANIL(_build(TwoInputs), head="head", adapt="head", inner_lr=INNER_LR)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("selection", ["*.bias", "head", "module", "predicate"])
def test_meta_gradient_of_a_chosen_subset_equals_the_reference(engine, selection):
    model = _build(TwoInputs)
    choice = {"*.bias": "*.bias", "head": "head", "module": [model.b, model.head],
              "predicate": lambda name, p: name.startswith("a.")}[selection]
    adapted = fastmeta.select_parameters(model, choice)
    batch = _draw("tuple")
    expected = reference(_build(TwoInputs), batch, "mse", adapted=adapted)
    learner = fastmeta.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, engine=engine,
                            adapt=choice)
    _assert_equal(_meta_gradient(learner, batch), expected)


class TiedHead(nn.Module):
    """A language-model-like head whose weight is the token embedding (as GPT-2's)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 6)
        self.lm_head = nn.Linear(6, 11, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.wte.weight.dtype)
        pooled = (torch.tanh(self.body(self.wte(input_ids))) * mask).sum(-2) / mask.sum(-2)
        return self.lm_head(pooled)


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_head_is_adapted_whole_by_anil_and_by_adapt(engine):
    model = _build(TiedHead)
    assert fastmeta.select_parameters(model, "lm_head") == ("wte.weight",)
    assert fastmeta.select_parameters(model, "lm_head.weight") == ("wte.weight",)
    anil = fastmeta.ANIL(_build(TiedHead), head="lm_head", inner_lr=INNER_LR,
                         inner_steps=STEPS, loss_fn="cross_entropy", engine=engine)
    assert anil.adapted_names() == ("wte.weight",)
    batch = _draw("mapping")
    expected = reference(_build(TiedHead), batch, "cross_entropy", adapted=("wte.weight",))
    _assert_equal(_meta_gradient(anil, batch), expected)
    maml = fastmeta.MAML(_build(TiedHead), inner_lr=INNER_LR, inner_steps=STEPS,
                         loss_fn="cross_entropy", engine=engine)
    maml.module.requires_grad_(True)
    selected = fastmeta.MAML(maml.module, inner_lr=INNER_LR, inner_steps=STEPS,
                             loss_fn="cross_entropy", engine=engine,
                             adapt=maml.module.lm_head)
    _assert_equal(_meta_gradient(selected, batch), expected)


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_anil_head_equals_adapt_of_the_same_module(engine):
    batch = _draw("tuple")
    anil = fastmeta.ANIL(_build(TwoInputs), head="head", inner_lr=INNER_LR,
                         inner_steps=STEPS, engine=engine)
    model = _build(TwoInputs)
    maml = fastmeta.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, engine=engine,
                         adapt=model.head)
    assert anil.adapted_names() == maml.adapted_names() == ("head.weight", "head.bias")
    a, m = _meta_gradient(anil, batch), _meta_gradient(maml, batch)
    for name in a:
        assert torch.equal(a[name], m[name]), name


def test_every_learner_takes_adapt():
    from tests._algorithms import ALGORITHMS

    for name, algorithm in ALGORITHMS.items():
        model = _build(TwoInputs)
        model.head = nn.Linear(5, 1).double()  # the registry's learners expect a head
        options: dict[str, Any] = {"adapt": "head"}
        if name == "anil":
            continue  # head= already; adapt= with head= is refused above
        learner = algorithm.build(model, **options)
        assert learner.adapted_names() == ("head.weight", "head.bias"), name


# ---------------------------------------------------------------------------- loss traps


def _mlp(out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 4), nn.Tanh(), nn.Linear(4, out))


def _step(learner: fastmeta.MetaLearner, batch: Any) -> Any:
    return learner.meta_step(batch, torch.optim.SGD(learner.parameters(), lr=0.0))


def test_targets_missing_their_last_dimension_are_refused():
    x, y = torch.randn(2, 5, 1), torch.randn(2, 5)
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"support set of task 0.*prediction has shape \(5, 1\) "
                                         r"but the targets have shape \(5,\) \(they would "
                                         r"broadcast to \(5, 5\).*y\.unsqueeze\(-1\)"):
        _step(learner, {"train": [x, y], "test": [x, y]})
    with pytest.raises(ValueError, match=r"y\.unsqueeze\(-1\)"):
        learner.adapt(x[0], y[0])


def test_integer_labels_with_a_regression_loss_are_refused():
    x, y = torch.randn(2, 5, 1), torch.randint(0, 3, (2, 5, 1))
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"loss_fn='mse' got targets of dtype torch.int64.*"
                                         r"loss_fn='cross_entropy'.*y\.float\(\)"):
        _step(learner, {"train": [x, y], "test": [x, y]})


def test_scalar_inputs_point_to_unsqueeze():
    x, y = torch.randn(2, 5), torch.randn(2, 5, 1)
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    with pytest.raises(ValueError, match=r"each example is a scalar.*\(2, 5\).*x\.unsqueeze\(-1\)"):
        _step(learner, {"train": [x, y], "test": [x, y]})
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(-1\)"):
        learner.adapt(torch.randn(5), torch.randn(5, 1))


def test_cross_entropy_traps():
    x = torch.randn(2, 5, 1)
    learner = fastmeta.MAML(_mlp(3), inner_lr=0.1, loss_fn="cross_entropy")
    floats = torch.randint(0, 3, (2, 5)).float()
    with pytest.raises(ValueError, match=r"floating-point targets of shape \(5,\) for class "
                                         r"scores \(5, 3\).*y\.long\(\)"):
        _step(learner, {"train": [x, floats], "test": [x, floats]})
    labels = torch.randint(0, 3, (2, 5))
    wide = labels.clone()
    wide[1, 2] = 7
    with pytest.raises(ValueError, match=r"query_y of task 1 holds the label 7, outside the "
                                         r"model's 3 classes.*\[0, 3\)"):
        _step(learner, {"train": [x, labels], "test": [x, wide]})
    with pytest.raises(ValueError, match=r"labels of shape \(5,\), got \(5, 1\).*squeeze\(-1\)"):
        _step(learner, {"train": [x, labels.unsqueeze(-1)], "test": [x, labels]})
    flat = fastmeta.MAML(nn.Sequential(nn.Linear(1, 1), nn.Flatten(0)), inner_lr=0.1,
                         loss_fn="cross_entropy")
    with pytest.raises(ValueError, match=r"class scores of shape \[examples, classes\].*"
                                         r"nn\.Linear\(features, num_classes\)"):
        _step(flat, {"train": [x, labels], "test": [x, labels]})
    ignored = labels.clone()
    ignored[0, 0] = -100  # F.cross_entropy's ignore_index is allowed
    _step(learner, {"train": [x, ignored], "test": [x, labels]})


def test_adapt_given_a_batch_points_to_adapt_many():
    x, y = torch.randn(2, 5, 1), torch.randn(2, 5, 1)
    learner = fastmeta.MAML(_mlp(), inner_lr=0.1)
    batch = {"train": [x, y], "test": [x, y]}
    with pytest.raises(TypeError, match=r"x is a whole batch.*learner\.adapt_many\(batch\)"):
        learner.adapt(batch)  # type: ignore[arg-type]
    _step(learner, batch)
    with pytest.raises(ValueError, match=r"x has shape \(2, 5, 1\): one leading dimension "
                                         r"more.*adapt_many"):
        learner.adapt(x, y)
    learner.adapt(x[0], y[0])  # one task is fine


def test_numpy_tasks_are_converted_at_the_data_boundary():
    from fastmeta.data import BatchMetaCollate

    rng = np.random.default_rng(0)
    tasks = [{"train": (rng.normal(size=(5, 1)), rng.normal(size=(5, 1))),
              "test": (rng.normal(size=(4, 1)), rng.normal(size=(4, 1)))} for _ in range(3)]
    batch = BatchMetaCollate()(tasks)
    assert isinstance(batch["train"], list) and batch["train"][0].shape == (3, 5, 1)
    assert torch.equal(batch["test"][1][2], torch.from_numpy(tasks[2]["test"][1]))
    learner = fastmeta.MAML(_mlp().double(), inner_lr=0.1)
    _step(learner, batch)
    numpy_batch = {"train": [rng.normal(size=(2, 5, 1)), rng.normal(size=(2, 5, 1))],
                   "test": [rng.normal(size=(2, 4, 1)), rng.normal(size=(2, 4, 1))]}
    _step(learner, numpy_batch)
    with pytest.raises(TypeError, match=r"support_x must be a torch\.Tensor \(or a tuple or "
                                        r"mapping of tensors\), got list holding a str"):
        learner.prepare(fastmeta.TaskBatch(["a"], torch.zeros(1, 1), torch.zeros(1, 1),
                                           torch.zeros(1, 1)))


def test_tree_leaves_must_agree_on_tasks():
    x = (torch.randn(2, 5, 3), torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match=r"every tensor of support_x must have one slice per "
                                         r"task along dim 0: support_x\[0\] holds 2 tasks but "
                                         r"support_x\[1\] holds 3"):
        fastmeta.MAML(_build(TwoInputs), inner_lr=0.1).prepare(
            {"train": [x, torch.randn(2, 5, 1)], "test": [x, torch.randn(2, 5, 1)]})


class Graph(nn.Module):
    """Node classification on one graph: ``forward(x [nodes, F], edge_index [2, edges])``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 6), nn.Linear(6, 2)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        source, target = edge_index
        h = torch.tanh(self.lin(x))
        return self.head(h + torch.zeros_like(h).index_add(0, target, h[source]))


def _graphs(seed: int = 0) -> dict[str, list[Any]]:
    """One graph per task: nodes are the examples; edge_index [tasks, 2, edges] is context."""
    g = torch.Generator().manual_seed(seed)

    def part(nodes: int) -> list[Any]:
        x = torch.randn(TASKS, nodes, 3, generator=g, dtype=torch.float64)
        edges = torch.randint(0, nodes, (TASKS, 2, 7), generator=g)
        return [(x, edges), torch.randint(0, 2, (TASKS, nodes), generator=g)]

    return {"train": part(5), "test": part(6)}


@pytest.mark.parametrize("engine", ENGINES)
def test_graph_inputs_with_per_task_edges(engine):
    batch = _graphs()
    expected = reference(_build(Graph), batch, "cross_entropy")
    learner = fastmeta.MAML(_build(Graph), inner_lr=INNER_LR, inner_steps=STEPS,
                            loss_fn="cross_entropy", engine=engine)
    _assert_equal(_meta_gradient(learner, batch), expected)
    (x, edges), _ = batch["test"]
    assert learner.adapt_many(batch)((x, edges)).shape == (TASKS, 6, 2)
    reptile = fastmeta.Reptile(_build(Graph), inner_lr=0.1, inner_steps=2, inner_batch_size=2,
                               loss_fn="cross_entropy", engine=engine)
    with pytest.raises(ValueError, match=r"inner_batch_size=2 needs every tensor of support_x "
                                         r"to be \[tasks, shots, \.\.\.\] with 5 shots.*"
                                         r"\(3, 2, 7\)"):
        _step(reptile, batch)


def test_collated_keyword_inputs_train():
    from fastmeta.data import BatchMetaCollate

    class Task:
        def __init__(self, seed: int) -> None:
            self.g = torch.Generator().manual_seed(seed)

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> tuple[dict[str, Tensor], int]:
            ids = torch.randint(1, 11, (5,), generator=self.g)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, i % 3

    batch = BatchMetaCollate()([collections.OrderedDict(train=Task(s), test=Task(s + 9))
                                for s in range(2)])
    assert set(batch["train"][0]) == {"input_ids", "attention_mask"}
    learner = fastmeta.MAML(_build(Tokens), inner_lr=0.1, loss_fn="cross_entropy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _step(learner, batch)
    assert np.isfinite(result.loss)


class NormedTwoInputs(TwoInputs):
    """Two inputs and a BatchNorm with running statistics, in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(5)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(self.norm(self.a(x) + self.b(z)))
        return self.head(h), h


@pytest.mark.parametrize("engine", ["vmap", "higher"])
def test_adapt_and_meta_loss_on_tuple_inputs_leave_batch_norm_untouched(engine):
    model = _build(NormedTwoInputs).train()
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    learner = fastmeta.MAML(model, inner_lr=INNER_LR, inner_steps=STEPS, engine=engine)
    batch = _draw("tuple")
    (sx, sy), (qx, _) = batch["train"], batch["test"]
    adapted = learner.adapt((sx[0][0], sx[1][0]), sy[0])
    prediction, _ = adapted(qx[0][0], qx[1][0])
    assert prediction.shape == (SHOTS + 1, 1)
    many = learner.adapt_many(batch)
    outputs = many(qx)
    assert isinstance(outputs, tuple) and outputs[0].shape == (TASKS, SHOTS + 1, 1)
    learner.meta_loss(batch)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None for p in model.parameters())

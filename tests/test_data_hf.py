"""N-way K-shot tasks from a local Hugging Face ``datasets.Dataset`` (no hub access)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import fastmeta
from fastmeta.data import BatchMetaDataLoader, HFFewShotDataset, hf_few_shot

datasets = pytest.importorskip("datasets")

ROWS = 120  # 12 classes x 10 rows


def rows(label_names: bool = False) -> Any:
    """Row ``i`` has input ``[i, -i]`` and class ``i % 12``: every input names its row."""
    data = {"x": [[float(i), -float(i)] for i in range(ROWS)],
            "text": [f"row {i}" for i in range(ROWS)],
            "label": [i % 12 for i in range(ROWS)]}
    if not label_names:
        return datasets.Dataset.from_dict(data)
    features = datasets.Features({
        "x": datasets.Sequence(datasets.Value("float32")), "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=[f"class-{c}" for c in range(12)])})
    return datasets.Dataset.from_dict(data, features=features)


def first_batch(tasks: Any, batch_size: int = 4, **loader: Any) -> Any:
    return next(iter(BatchMetaDataLoader(tasks, batch_size=batch_size, **loader)))


def test_tasks_are_n_way_k_shot_over_the_classes_of_one_split() -> None:
    tasks = hf_few_shot(rows(), ways=3, shots=2, test_shots=4, input_column="x", seed=0)
    batch = first_batch(tasks)
    (sx, sy), (qx, qy) = batch["train"], batch["test"]
    assert sx.shape == (4, 6, 2) and qx.shape == (4, 12, 2)
    assert sy.dtype == torch.long and sorted(sy[0].tolist()) == [0, 0, 1, 1, 2, 2]
    train_classes = set(tasks.dataset.labels)
    for t in range(4):
        support_rows = sx[t, :, 0].long().tolist()
        query_rows = qx[t, :, 0].long().tolist()
        assert not set(support_rows) & set(query_rows)  # support and query rows differ
        by_target: dict[int, set[int]] = {}
        for row, target in zip(support_rows + query_rows, sy[t].tolist() + qy[t].tolist()):
            by_target.setdefault(target, set()).add(row % 12)
        # each target is one original class, three distinct classes, all of meta-train
        assert all(len(c) == 1 for c in by_target.values()) and len(by_target) == 3
        assert set().union(*by_target.values()) <= train_classes


def test_class_splits_are_disjoint_and_fixed_by_split_seed() -> None:
    splits = {s: set(HFFewShotDataset(rows(), 2, input_column="x", meta_split=s,
                                      seed=0).dataset.labels)
              for s in ("train", "val", "test")}
    assert sum(len(c) for c in splits.values()) == 12
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"]
                or splits["val"] & splits["test"])
    again = HFFewShotDataset(rows(), 2, input_column="x", meta_split="val", seed=5)
    assert set(again.dataset.labels) == splits["val"]
    named = HFFewShotDataset(rows(), 2, input_column="x", class_splits={
        "train": [0, 1, 2, 3], "test": [4, 5]}, meta_split="test", seed=0)
    assert named.dataset.labels == [4, 5]


def test_same_seed_same_tasks_in_any_number_of_workers() -> None:
    def batch(seed: int, **loader: Any) -> Any:
        tasks = hf_few_shot(rows(), ways=3, shots=2, input_column="x", seed=seed)
        return first_batch(tasks, **loader)["train"][0]

    assert torch.equal(batch(7), batch(7))
    assert torch.equal(batch(7), batch(7, num_workers=2))
    assert not torch.equal(batch(7), batch(8))


def test_a_transform_of_the_row_builds_keyword_inputs() -> None:
    def tokenise(row: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([ord(c) % 32 for c in row["text"].ljust(8)[:8]])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    tasks = hf_few_shot(rows(label_names=True), ways=2, shots=1, test_shots=1,
                        transform=tokenise, seed=0)
    batch = first_batch(tasks, batch_size=3)
    assert batch["train"][0]["input_ids"].shape == (3, 2, 8)
    assert tasks.dataset.dataset.classes == [f"class-{c}" for c in range(12)]
    assert "class-" in tasks.dataset.describe_class(0)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / ROWS)


def test_hf_tasks_flow_into_meta_step() -> None:
    tasks = hf_few_shot(rows(), ways=3, shots=2, test_shots=3, input_column="x", seed=0)
    learner = fastmeta.MAML(Classifier(), inner_lr=0.5, loss_fn="cross_entropy")
    optimizer = torch.optim.Adam(learner.parameters(), 1e-2)
    before = [p.detach().clone() for p in learner.parameters()]
    losses = [learner.meta_step(batch, optimizer).loss
              for batch, _ in zip(BatchMetaDataLoader(tasks, batch_size=4), range(3))]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"label_column": "y", "input_column": "x"}, ValueError,
         r"label_column='y' is not a column of the dataset; its columns are \['x', 'text', "),
        ({"input_column": "pixels"}, ValueError, "input_column='pixels' is not a column"),
        ({}, ValueError, "give exactly one of input_column .* or transform"),
        ({"input_column": "x", "transform": len}, ValueError,
         "give exactly one of input_column"),
        ({"transform": 3}, TypeError, "transform must be a function of one row.*int"),
    ],
    ids=["label-column", "input-column", "neither", "both", "transform"],
)
def test_bad_columns_are_named(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        HFFewShotDataset(rows(), 2, **kwargs)


def test_a_dataset_dict_or_a_list_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"datasets.Dataset .*got list"):
        HFFewShotDataset([1, 2, 3], 2, input_column="x")
    splits = datasets.DatasetDict({"train": rows()})
    with pytest.raises(TypeError, match=r"got DatasetDict; for a DatasetDict pick a split"):
        HFFewShotDataset(splits, 2, input_column="x")


def test_a_streamed_dataset_is_refused_with_the_fix() -> None:
    streamed = rows().to_iterable_dataset()
    with pytest.raises(TypeError, match=r"IterableDataset \(a streamed dataset\).*take\(n\)"):
        HFFewShotDataset(streamed, 2, input_column="x")


def test_torch_formatted_rows_give_the_same_tasks() -> None:
    plain = hf_few_shot(rows(), ways=3, shots=2, input_column="x", seed=4)
    formatted = hf_few_shot(rows().with_format("torch"), ways=3, shots=2, input_column="x",
                            seed=4)
    a, b = first_batch(plain), first_batch(formatted)
    assert torch.equal(a["train"][0], b["train"][0]) and torch.equal(a["test"][1], b["test"][1])


def test_too_few_classes_for_the_ways_is_an_error() -> None:
    with pytest.raises(
        ValueError, match="num_classes_per_task=9 but the meta-train split has only 8"
    ):
        hf_few_shot(rows(), ways=9, shots=1, input_column="x", seed=0)


class BagOfWords(nn.Module):
    """Mean of token embeddings under the mask, then a linear head: keyword inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        return self.head((self.embed(input_ids) * mask).sum(-2) / mask.sum(-2).clamp(min=1))


def test_text_rows_with_named_topics_and_held_out_topics_flow_into_meta_step() -> None:
    topics = ["sports", "food", "weather", "music", "travel", "film"]
    text = datasets.Dataset.from_dict({
        "input_ids": [[(i * 7 + k) % 31 + 1 for k in range(i % 4 + 3)] for i in range(60)],
        "topic": [topics[i % 6] for i in range(60)],
    })

    def tokens(row: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids = torch.zeros(8, dtype=torch.long)
        ids[: len(row["input_ids"])] = torch.tensor(row["input_ids"])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    splits = {"train": topics[:4], "test": topics[4:]}
    train = hf_few_shot(text, ways=2, shots=2, test_shots=3, label_column="topic",
                        transform=tokens, class_splits=splits, seed=0)
    held_out = hf_few_shot(text, ways=2, shots=2, test_shots=3, label_column="topic",
                           transform=tokens, class_splits=splits, meta_split="test", seed=0)
    assert train.dataset.labels == sorted(topics[:4]) and held_out.dataset.labels == ["film",
                                                                                     "travel"]
    learner = fastmeta.MAML(BagOfWords(), inner_lr=0.5, loss_fn="cross_entropy",
                            engine="loop")
    optimizer = torch.optim.Adam(learner.parameters(), 1e-2)
    batch = first_batch(train, batch_size=3)
    assert batch["train"][0]["attention_mask"].shape == (3, 4, 8)
    result = learner.meta_step(batch, optimizer)
    assert result.task_losses.shape == (3,) and torch.isfinite(result.task_losses).all()
    assert len(held_out) == 1  # two held-out topics: one 2-way combination
    adapted = learner.adapt_many(first_batch(held_out, batch_size=1), steps=2)
    assert adapted.support_losses.shape == (1, 2)

"""examples/text_classification.py at tiny sizes: a Hugging Face BERT with keyword inputs."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

PATH = Path(__file__).parents[1] / "examples" / "text_classification.py"


def _example():
    spec = importlib.util.spec_from_file_location("text_classification", PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bert_meta_trains_on_keyword_inputs_adapting_only_the_chosen_parameters():
    example = _example()
    result = example.train(iterations=2, tasks=2, ways=2, shots=2, queries=2, inner_steps=1,
                           eval_tasks=2)
    assert all(math.isfinite(loss) for loss in result["losses"])
    learner = result["learner"]
    adapted = learner.adapted_names()
    assert "classifier.weight" in adapted
    assert all(name == "classifier.weight" or name.endswith(".bias") for name in adapted)
    batch = example.make_batch(torch.Generator().manual_seed(3), tasks=2, ways=2, shots=2,
                               queries=2)
    assert set(batch["train"][0]) == {"input_ids", "attention_mask"}
    tasks = learner.adapt_many(batch, steps=1)
    for name, value in learner.module.named_parameters():
        moved = not torch.equal(tasks.params[name][0], value.detach())
        assert moved == (name in adapted), name
    assert tasks(batch["test"][0]).logits.shape == (2, 4, 2)

"""Meta-learn LoRA adapters for few-shot text classification, then adapt to a new task and save.

The model is a small Hugging Face BERT built from a config (nothing is downloaded), trained
for a few seconds to classify the topics of sentences (a stand-in for a pretrained
checkpoint: with ``from_pretrained`` the rest of the code is the same), then wrapped by peft:
``get_peft_model(bert, LoraConfig(target_modules=["query", "value"],
modules_to_save=["classifier"]))``. peft freezes BERT and leaves the LoRA matrices and a
copy of the classifier trainable, so fastmeta's MAML meta-learns exactly those (its
default ``adapt=`` is every trainable parameter) and BERT's own weights are never written.
The default engine vectorises the inner loops of all tasks, padded attention masks
included.

The data set is written here: sentences about twelve topics (sports, food, weather, ...),
made of topic words and filler words, padded to a fixed length and tokenised with a
word-level vocabulary. A task is ``ways`` topics drawn at random, each with a random label;
eight topics are used for meta-training and four are held out for the new task.

After meta-training, the script adapts the adapters to one new task in a few steps and
saves both the meta-learned and the adapted adapter with peft's ``save_pretrained``:
``PeftModel.from_pretrained(base_model, folder)`` loads them with peft alone.

Usage:
    python examples/lora_few_shot_text.py                 # 300 meta-iterations
    python examples/lora_few_shot_text.py --quick         # 40 meta-iterations
    python examples/lora_few_shot_text.py --out adapters  # where the adapters go

Measured with --quick (27 s on two shared CPU cores, one thread): query loss 0.82 -> 0.67
over the run; held-out topics, 3-way 2-shot query accuracy after 3 adaptation steps 0.33
(chance) before meta-training, 0.45 after; the saved adapter, reloaded with peft, 0.50 on
its own task's queries.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import fastmeta

TOPICS = {
    "sports": "goal match team coach score league player stadium",
    "food": "bread soup recipe kitchen spice dinner flavour oven",
    "weather": "rain cloud storm sunny wind forecast snow cold",
    "music": "guitar song melody concert drum album singer piano",
    "travel": "flight hotel passport beach luggage journey map train",
    "science": "atom experiment theory cell energy physics lab data",
    "animals": "dog cat bird horse whale tiger forest zoo",
    "health": "doctor fever medicine clinic sleep exercise pulse nurse",
    "money": "bank loan price market stock coin budget salary",
    "film": "movie actor scene camera cinema director script screen",
    "garden": "flower seed soil tree leaf water rose grass",
    "school": "teacher lesson exam pupil class homework book grade",
}
FILLER = ["the", "a", "of", "and", "to", "in", "is", "it", "was", "for", "on", "with", "as",
          "at", "by", "this", "that", "very"]
HELD_OUT = ("film", "garden", "school", "money")  # the new tasks' topics
LENGTH = 12
VOCAB = ["[PAD]", *FILLER, *sorted({w for words in TOPICS.values() for w in words.split()})]
TOKEN = {word: i for i, word in enumerate(VOCAB)}


def sentence(topic: str, generator: torch.Generator) -> list[int]:
    """Token ids of a random sentence on ``topic``, padded to ``LENGTH`` with 0."""
    words = TOPICS[topic].split()
    length = int(torch.randint(6, LENGTH + 1, (), generator=generator))
    picks = []
    for _ in range(length):  # about one word in three is a topic word
        pool = words if torch.rand((), generator=generator) < 0.35 else FILLER
        picks.append(pool[int(torch.randint(len(pool), (), generator=generator))])
    return [TOKEN[w] for w in picks] + [0] * (LENGTH - length)


def make_batch(generator: torch.Generator, topics: list[str], *, tasks: int, ways: int,
               shots: int, queries: int) -> fastmeta.TaskBatch:
    """``tasks`` classification tasks of ``ways`` topics with random labels."""
    parts: dict[str, list[Any]] = {"support": [[], []], "query": [[], []]}
    for _ in range(tasks):
        chosen = [topics[int(i)] for i in torch.randperm(len(topics), generator=generator)[:ways]]
        for part, per_class in (("support", shots), ("query", queries)):
            ids = [sentence(t, generator) for t in chosen for _ in range(per_class)]
            parts[part][0].append(torch.tensor(ids))
            parts[part][1].append(torch.arange(ways).repeat_interleave(per_class))

    def inputs(part: str) -> dict[str, torch.Tensor]:
        ids = torch.stack(parts[part][0])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    return fastmeta.TaskBatch(inputs("support"), torch.stack(parts["support"][1]),
                              inputs("query"), torch.stack(parts["query"][1]))


def bert(labels: int, *, seed: int = 0) -> torch.nn.Module:
    """A small BERT classifier from a config (random weights; nothing is downloaded)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=LENGTH, num_labels=labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return transformers.BertForSequenceClassification(config)


@functools.cache
def _pretrained_encoder(seed: int, steps: int) -> dict[str, torch.Tensor]:
    """BERT's encoder after ``steps`` of topic classification on the meta-training topics'
    sentences: a stand-in for a pretrained checkpoint (it has never seen the new topics)."""
    topics = [t for t in TOPICS if t not in HELD_OUT]
    model = bert(len(topics), seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        labels = torch.randint(len(topics), (32,), generator=generator)
        ids = torch.tensor([sentence(topics[int(i)], generator) for i in labels])
        logits = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.bert.state_dict().items()}


def base_model(ways: int, *, seed: int = 0, pretrain_steps: int = 60) -> torch.nn.Module:
    """The "pretrained" BERT with a new ``ways``-label head (see :func:`_pretrained_encoder`)."""
    model = bert(ways, seed=seed)
    model.bert.load_state_dict(_pretrained_encoder(seed, pretrain_steps))
    return model


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    """peft's LoRA on the attention's query and value, and a trainable classifier copy."""
    import peft

    config = peft.LoraConfig(target_modules=["query", "value"], r=8, lora_alpha=16,
                             lora_dropout=0.0, modules_to_save=["classifier"])
    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 for a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def accuracy(learner: fastmeta.MetaLearner, batch: fastmeta.TaskBatch, steps: int) -> float:
    """Query accuracy after adapting to each task's support set."""
    adapted = learner.adapt_many(batch, steps=steps)
    logits = adapted(batch.query_x).logits  # stacked over tasks
    return float((logits.argmax(-1) == batch.query_y).float().mean())


def train(*, iterations: int, tasks: int = 4, ways: int = 3, shots: int = 2, queries: int = 4,
          inner_steps: int = 3, eval_tasks: int = 16, seed: int = 0) -> dict[str, Any]:
    """Meta-train the adapters; returns the held-out accuracy before and after, and more."""
    model = with_lora(base_model(ways, seed=seed))
    learner = fastmeta.MAML(model, inner_lr=0.5, inner_steps=inner_steps,
                            loss_fn="cross_entropy")
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    seen = [t for t in TOPICS if t not in HELD_OUT]
    generator = torch.Generator().manual_seed(seed)
    held_out = make_batch(torch.Generator().manual_seed(seed + 1), list(HELD_OUT),
                          tasks=eval_tasks, ways=ways, shots=shots, queries=queries)
    before = accuracy(learner, held_out, inner_steps)
    losses = [learner.meta_step(make_batch(generator, seen, tasks=tasks, ways=ways,
                                           shots=shots, queries=queries), optimizer).loss
              for _ in range(iterations)]
    return {"before": before, "after": accuracy(learner, held_out, inner_steps),
            "losses": losses, "learner": learner, "held_out": held_out}


def adapt_and_save(learner: fastmeta.MetaLearner, task: fastmeta.TaskBatch, steps: int,
                   out: Path) -> fastmeta.AdaptedModel:
    """Adapt to the first task of ``task`` and save the meta-learned and adapted adapters."""
    support = {k: v[0] for k, v in task.support_x.items()}
    adapted = learner.adapt(support, task.support_y[0], steps=steps)
    learner.module.save_pretrained(out / "meta-learned")  # the starting point for new tasks
    adapted.as_module().save_pretrained(out / "adapted")  # this task's adapter
    return adapted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 meta-iterations")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the adapters (default: a temporary one)")
    args = parser.parse_args()
    result = train(iterations=40 if args.quick else 300)
    learner = result["learner"]
    print(f"engine: {learner.engine}; meta-learned: {len(learner.adapted_names())} adapter "
          f"tensors, BERT's {sum(1 for p in learner.module.parameters() if not p.requires_grad)}"
          f" tensors untouched")
    losses = result["losses"]
    print(f"query loss: {sum(losses[:10]) / 10:.3f} (first 10) -> "
          f"{sum(losses[-10:]) / 10:.3f} (last 10)")
    print(f"held-out topics, 3-way 2-shot query accuracy after adaptation: "
          f"{result['before']:.2f} before meta-training -> {result['after']:.2f} after")
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        adapt_and_save(learner, result["held_out"], learner.inner_steps, out)
        import peft

        task = result["held_out"]
        query = {k: v[0] for k, v in task.query_x.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # as in with_lora
            loaded = peft.PeftModel.from_pretrained(base_model(3), out / "adapted")
        hits = (loaded(**query).logits.argmax(-1) == task.query_y[0]).float().mean()
        print(f"adapter saved in {out / 'adapted'}; reloaded with peft alone, it classifies "
              f"the new task's queries with accuracy {float(hits):.2f}")


if __name__ == "__main__":
    main()

"""peft adapters (LoRA, IA³) on a Hugging Face BERT: meta-learned exactly, saved as peft saves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastmeta
from tests._zoo import finite_difference_check

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()

VOCAB, CLASSES = 20, 3


def _bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=12, max_position_embeddings=16, num_labels=CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0,
        initializer_range=0.3)  # weights large enough for gradients far above rounding
    return transformers.BertForSequenceClassification(config).double()


def _adapter(method: str) -> object:
    if method == "lora":  # random B as well as A: the meta-gradient of A is not zero
        return peft.LoraConfig(target_modules=["query", "value"], r=2, lora_alpha=4,
                               lora_dropout=0.0, init_lora_weights=False)
    return peft.IA3Config(target_modules=["key", "value", "dense"],
                          feedforward_modules=["dense"])


def _peft_model(method: str, seed: int = 0) -> torch.nn.Module:
    model = peft.get_peft_model(_bert(seed), _adapter(method))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # IA³ starts at ones: move off the identity
        for name, param in model.named_parameters():
            if param.requires_grad and "ia3_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.double()


def _task(tasks: int = 2, seed: int = 0) -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (tasks, 4, 6), generator=g)
    ids[:, ::2, 4:] = 0  # every other sequence padded
    labels = torch.randint(0, CLASSES, (tasks, 4), generator=g)
    inputs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    flipped = {k: v.flip(1) for k, v in inputs.items()}
    return fastmeta.TaskBatch(inputs, labels, flipped, labels.flip(1))


def _reference(model: torch.nn.Module, task: fastmeta.TaskBatch, *, inner_lr: float,
               steps: int) -> dict[str, torch.Tensor]:
    """Second-order MAML on the adapter weights, task by task, with functional_call (and
    the math kernel of attention: CPU's fused one has no double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        return _reference_math(model, task, inner_lr=inner_lr, steps=steps)


def _reference_math(model: torch.nn.Module, task: fastmeta.TaskBatch, *, inner_lr: float,
                    steps: int) -> dict[str, torch.Tensor]:
    adapter = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in adapter.items()}
    for t in range(task.num_tasks):
        support = {k: v[t] for k, v in task.support_x.items()}
        query = {k: v[t] for k, v in task.query_x.items()}
        fast = dict(adapter)
        for _ in range(steps):
            logits = functional_call(model, fast, (), support).logits
            grads = torch.autograd.grad(F.cross_entropy(logits, task.support_y[t]),
                                        list(fast.values()), create_graph=True)
            fast = {n: p - inner_lr * g for (n, p), g in zip(fast.items(), grads)}
        logits = functional_call(model, fast, (), query).logits
        loss = F.cross_entropy(logits, task.query_y[t]) / task.num_tasks
        for (n, _), g in zip(adapter.items(), torch.autograd.grad(loss, list(adapter.values()))):
            total[n] += g
    return total


METHODS = {"lora": "*lora_*", "ia3": "*ia3_*"}


@pytest.mark.parametrize("method", METHODS)
def test_the_default_engine_meta_learns_only_the_adapter_exactly(method):
    task = _task()
    expected = _reference(_peft_model(method), task, inner_lr=0.3, steps=2)
    model = _peft_model(method)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    learner = fastmeta.MAML(model, inner_lr=0.3, inner_steps=2, adapt=METHODS[method],
                            loss_fn="cross_entropy")
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.1))
    assert learner.engine == "vmap"  # checked against a per-task engine, then timed
    assert learner.engine_decision.checked == ("meta_gradient",)
    assert "checked against loop" in learner.engine_decision.reason  # higher cannot copy peft
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected) and all(METHODS[method][1:-1] in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-8, atol=1e-12)
    for name, param in model.named_parameters():  # the base model is never written
        if name in base:
            assert torch.equal(param, base[name]), name


def test_a_lora_meta_gradient_matches_finite_differences():
    task = _task()
    model = _peft_model("lora")
    learner = fastmeta.MAML(model, inner_lr=0.3, inner_steps=2, adapt="*lora_*",
                            loss_fn="cross_entropy", engine="vmap")
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    gradient = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    worst = finite_difference_check(model, task, gradient,
                                    lambda: learner.meta_loss(task).detach(), per_parameter=2,
                                    eps=1e-5)
    assert worst < 1e-6


@pytest.mark.slow
def test_compile_true_meta_learns_a_lora_adapter_exactly():
    # The compiled meta-gradient (the inner loops and their differentiation in one compiled
    # function) on padded attention masks, against the per-task reference, in float64.
    torch._dynamo.reset()  # compile afresh (torch stops compiling after a few functions)
    task = _task()
    expected = _reference(_peft_model("lora"), task, inner_lr=0.3, steps=2)
    model = _peft_model("lora")
    learner = fastmeta.MAML(model, inner_lr=0.3, inner_steps=2, loss_fn="cross_entropy",
                            engine="vmap", compile=True)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    for _ in range(2):  # the second call reuses the compiled function
        learner.meta_step(task, optimizer)
    assert learner._engine.compile  # compiled, not fallen back
    assert [len(reached) for reached in learner._engine._reached.values()] == [len(expected)]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-8, atol=1e-12)


def test_meta_learned_and_adapted_adapters_load_with_peft_alone(tmp_path):
    model = _peft_model("lora")
    learner = fastmeta.MAML(model, inner_lr=0.3, adapt="*lora_*", loss_fn="cross_entropy")
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-2)
    for seed in range(3):
        learner.meta_step(_task(seed=seed), optimizer)
    model.save_pretrained(tmp_path / "meta")  # peft's own format: the adapter alone
    new = _task(tasks=1, seed=9)
    support = {k: v[0] for k, v in new.support_x.items()}
    query = {k: v[0] for k, v in new.query_x.items()}
    adapted = learner.adapt(support, new.support_y[0], steps=3)
    adapted.as_module().save_pretrained(tmp_path / "task")

    for folder, expected in (("meta", model(**query).logits), ("task", adapted(**query).logits)):
        loaded = peft.PeftModel.from_pretrained(_bert(), tmp_path / folder).double()
        torch.testing.assert_close(loaded(**query).logits, expected, rtol=1e-10, atol=1e-12)
    before = peft.get_peft_model(_bert(), _adapter("lora")).double()
    assert not torch.allclose(before(**query).logits, adapted(**query).logits)

"""Models no one here wrote: Hugging Face BERT and GPT-2 from tiny configs (no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastmeta
from tests._zoo import finite_difference_check, reference_meta_gradient

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB, CLASSES = 20, 3


class TextClassifier(nn.Module):
    """Token ids ``[n, length]`` (0 is padding) to class logits."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind.startswith("bert"):
            config = transformers.BertConfig(
                vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=12, max_position_embeddings=16, num_labels=CLASSES,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
            self.net = transformers.BertForSequenceClassification(config)
        else:
            config = transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            self.net = transformers.GPT2Model(config)
            self.head = nn.Linear(8, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).long() if self.kind.endswith("-masked") else None
        if self.kind.startswith("bert"):
            return self.net(input_ids=ids, attention_mask=mask).logits
        return self.head(self.net(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1))


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return TextClassifier(kind).double().train()


def _task() -> fastmeta.TaskBatch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 4, 6), generator=g)
    ids[..., 4:] = 0  # padded sequences
    labels = torch.randint(0, CLASSES, (2, 4), generator=g)
    return fastmeta.TaskBatch(ids, labels, ids.flip(1), labels.flip(1))


KINDS = ["bert", "bert-masked", "gpt2", "gpt2-masked"]


@pytest.mark.parametrize("kind", KINDS)
def test_meta_gradient_equals_the_per_task_reference(kind):
    task = _task()
    with sdpa_kernel(SDPBackend.MATH):
        _, expected = reference_meta_gradient(_model(kind), task, algorithm="maml",
                                              inner_lr=0.1, steps=2, loss=F.cross_entropy)
    for engine in ("higher", "vmap", "auto"):
        model = _model(kind)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "engine='auto' uses the 'higher' engine")
            learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=2, engine=engine,
                                    loss_fn="cross_entropy")
            learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
        for name, param in model.named_parameters():
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-8, atol=1e-12,
                                       msg=lambda m, n=name, e=engine: f"{e} {n}: {m}")
        if engine == "auto":  # padded masks vectorise too: checked, then timed
            assert learner.engine == "vmap"
            assert learner.engine_decision.checked == ("meta_gradient",)


@pytest.mark.parametrize("kind", ["bert-masked", "gpt2-masked"])
def test_padded_masks_on_the_vectorised_engine_match_finite_differences(kind):
    task = _task()
    model = _model(kind)
    learner = fastmeta.MAML(model, inner_lr=0.1, inner_steps=2, engine="vmap",
                            loss_fn="cross_entropy")
    learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
    gradient = {n: p.grad.clone() for n, p in model.named_parameters()}
    worst = finite_difference_check(
        model, task, gradient, lambda: learner.meta_loss(task).detach(), per_parameter=1)
    assert worst < 1e-6


def test_the_masks_transformers_checks_are_restored_after_the_engine_ran():
    from transformers import masking_utils

    original = masking_utils.is_tracing
    learner = fastmeta.MAML(_model("bert-masked"), inner_lr=0.1, engine="vmap",
                            loss_fn="cross_entropy")
    learner.meta_step(_task(), torch.optim.SGD(learner.parameters(), lr=0.0))
    assert masking_utils.is_tracing is original


def test_meta_training_a_bert_lowers_its_query_loss():
    torch.manual_seed(1)
    model = TextClassifier("bert")  # float32, as users run it
    learner = fastmeta.MAML(model, inner_lr=0.5, loss_fn="cross_entropy")
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-3)
    task = _task()
    losses = [learner.meta_step(task, optimizer).loss for _ in range(15)]
    assert learner.engine in ("vmap", "loop")  # exact either way; the tuner measured them
    assert losses[-1] < losses[0]
    before = [p.detach().clone() for p in model.parameters()]
    learner.adapt(task.support_x[0], task.support_y[0], steps=3)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_imaml_runs_through_attention_on_every_engine():
    task = _task()
    grads = {}
    for engine in ("vmap", "loop"):
        model = _model("bert-masked")
        learner = fastmeta.IMAML(model, inner_lr=0.1, inner_steps=2, lam=1.0, engine=engine,
                                 loss_fn="cross_entropy")
        learner.meta_step(task, torch.optim.SGD(learner.parameters(), lr=0.0))
        grads[engine] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["vmap"], grads["loop"]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_mask_contexts_nest_and_only_hide_the_values_torch_func_wraps():
    from transformers import masking_utils

    from fastmeta.engines._masks import vectorised_masks

    original = masking_utils.is_tracing
    with vectorised_masks():
        patched = masking_utils.is_tracing
        with vectorised_masks():
            assert masking_utils.is_tracing is patched
        assert masking_utils.is_tracing is patched
        mask = torch.ones(3, 5, dtype=torch.bool)
        assert not patched(mask)  # a plain mask is read (and skipped where it masks nothing)
        seen = []
        torch.func.vmap(lambda m: seen.append(patched(m)) or m)(mask)
        assert seen == [True]
    assert masking_utils.is_tracing is original

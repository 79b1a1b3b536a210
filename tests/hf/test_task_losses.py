"""Issue 10, kind 3: DPTrainer's objective comes from the model's declared task, never from tensor shapes.

Per-example losses are checked against the model's own (batch-averaged) Hugging Face loss on one example at
a time, which is that example's loss by definition; and each L_i is checked to depend on example i alone.
"""
from __future__ import annotations

import pytest
import torch

from ghostdp.engine.loss import per_example_lm_loss, per_example_sequence_loss, per_example_token_loss
from tests.hf.trainer_helpers import lora, make_args
from tests.helpers import tiny_llama


def llama_cfg(**kw):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, **kw)
    cfg._attn_implementation = "eager"
    return cfg


def token_cls_model(seed=0):
    from transformers import LlamaForTokenClassification

    torch.manual_seed(seed)
    return LlamaForTokenClassification(llama_cfg(num_labels=5, classifier_dropout=0.0)).double()


def bert_cls(num_labels, problem_type=None, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24,
                     max_position_embeddings=32, num_labels=num_labels, problem_type=problem_type,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).double().eval()


def tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg).double().eval()


def token_rows(n, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(2, T + 1, (1,), generator=g))
        ids = torch.randint(1, 50, (length,), generator=g).tolist()
        labels = torch.randint(0, 5, (length,), generator=g).tolist()
        labels[0] = -100  # an unscored position
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def pad_tokens(rows):
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], mask[i, :n], labels[i, :n] = torch.tensor(r["input_ids"]), 1, torch.tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------ task detection
@pytest.mark.parametrize("make, task", [
    (lambda: tiny_llama(False), "causal_lm"),
    (lambda: lora(tiny_llama(True)), "causal_lm"),
    (token_cls_model, "token_classification"),
    (lambda: lora_any(token_cls_model()), "token_classification"),
    (lambda: bert_cls(3), "sequence_classification"),
    (tiny_t5, "seq2seq_lm"),
])
def test_model_task_from_the_declared_class(make, task):
    from ghostdp.integrations.hf.trainer import model_task

    assert model_task(make()) == task


def lora_any(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="TOKEN_CLS"))


def test_subclass_keeps_its_task_and_unknown_models_are_none():
    from transformers import LlamaForCausalLM, LlamaForQuestionAnswering

    from ghostdp.integrations.hf.trainer import model_task

    class MyLM(LlamaForCausalLM):
        pass

    assert model_task(MyLM(llama_cfg())) == "causal_lm"
    assert model_task(LlamaForQuestionAnswering(llama_cfg())) is None
    # Masked LM: logits (B, T, V) and labels (B, T) look like a causal LM, but the objective is not shifted.
    from transformers import BertConfig, BertForMaskedLM

    masked = BertForMaskedLM(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=24, max_position_embeddings=32))
    assert model_task(masked) is None
    assert model_task(torch.nn.Sequential(torch.nn.Linear(3, 3))) is None


# ------------------------------------------------------------------------------------ losses vs Hugging Face
def test_token_loss_is_aligned_and_matches_the_models_own_loss_per_example():
    model = token_cls_model()
    batch = pad_tokens(token_rows(4, seed=1))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = per_example_token_loss(logits, batch["labels"])
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        own = model(input_ids=batch["input_ids"][i:i + 1, :n], labels=batch["labels"][i:i + 1, :n]).loss
        torch.testing.assert_close(ours[i], own.to(ours.dtype), rtol=1e-6, atol=1e-9)  # HF upcasts to fp32 only
    shifted = per_example_lm_loss(logits, batch["labels"])
    assert not torch.allclose(ours, shifted)  # the wrong (shifted) objective differs


@pytest.mark.parametrize("num_labels, problem_type, labels", [
    (3, None, torch.tensor([0, 2, 1])),
    (1, None, torch.tensor([0.5, -1.0, 2.0])),
    (2, "regression", torch.tensor([[0.5, 1.0], [-1.0, 0.0], [2.0, 1.5]])),
    (3, "multi_label_classification", torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])),
])
def test_sequence_loss_matches_the_models_own_loss_per_example(num_labels, problem_type, labels):
    model = bert_cls(num_labels, problem_type)
    ids = torch.randint(1, 40, (3, 6), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    ours = per_example_sequence_loss(logits, labels, model.config.problem_type)
    for i in range(3):
        own = model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss
        torch.testing.assert_close(ours[i], own.to(ours.dtype), rtol=1e-6, atol=1e-9)  # HF may upcast to fp32 only


def test_seq2seq_loss_matches_the_models_own_loss_per_example():
    model = tiny_t5()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 40, (3, 6), generator=g)
    labels = torch.randint(1, 40, (3, 4), generator=g)
    labels[0, 3] = -100
    dec = model.prepare_decoder_input_ids_from_labels(labels=labels)
    logits = model(input_ids=ids, decoder_input_ids=dec).logits
    ours = per_example_token_loss(logits, labels)
    for i in range(3):
        own = model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss
        torch.testing.assert_close(ours[i], own, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fn, shape", [(per_example_token_loss, (4, 6, 5)), (per_example_lm_loss, (4, 6, 5)),
                                       (per_example_sequence_loss, (4, 5))])
def test_each_loss_depends_on_its_own_example_only(fn, shape):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, shape[:-1], generator=g)
    if labels.dim() == 2:
        labels[1, :4] = -100
    losses = fn(logits, labels)
    for i in range(shape[0]):
        (grad,) = torch.autograd.grad(losses[i], logits, retain_graph=True)
        others = torch.cat([grad[:i], grad[i + 1:]])
        assert torch.count_nonzero(others) == 0


# ------------------------------------------------------------------------------------ DPTrainer
def test_dptrainer_trains_token_classification_on_the_aligned_loss(tmp_path):
    """The issue's case: LlamaForTokenClassification used to get the shifted next-token loss, silently."""
    from ghostdp.integrations.hf.trainer import DPTrainer

    model = token_cls_model()
    trainer = DPTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=token_rows(8),
                        data_collator=pad_tokens)
    assert trainer._task == "token_classification"
    batch = pad_tokens(token_rows(4, seed=5))
    got = trainer.compute_per_example_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, per_example_token_loss(logits, batch["labels"]), rtol=0, atol=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.privacy_engine.steps == 2
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


class Unknown(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.head(self.emb(input_ids))}


def test_dptrainer_refuses_a_model_of_unknown_task_unless_given_a_loss(tmp_path):
    from ghostdp.integrations.hf.trainer import DPTrainer

    args = make_args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="cannot tell the training objective of Unknown.*per_example_loss="):
        DPTrainer(model=Unknown(), args=args, train_dataset=token_rows(8), data_collator=pad_tokens)
    trainer = DPTrainer(model=Unknown(), args=args, train_dataset=token_rows(8), data_collator=pad_tokens,
                        per_example_loss="token_classification")
    assert trainer._per_example_loss is per_example_token_loss
    trainer = DPTrainer(model=Unknown(), args=args, train_dataset=token_rows(8), data_collator=pad_tokens,
                        per_example_loss=per_example_token_loss)
    trainer.train()
    assert trainer.privacy_engine.steps == 1
    with pytest.raises(ValueError, match="not a task DPTrainer knows"):
        DPTrainer(model=Unknown(), args=args, train_dataset=token_rows(8), data_collator=pad_tokens,
                  per_example_loss="question_answering")


def test_dptrainer_fine_tunes_bert_out_of_the_box(tmp_path):
    """Issue 10 kind 2 through DPTrainer: BertForSequenceClassification, every parameter trainable, position ids
    (1, T) broadcast by the model itself. Used to raise a batch mismatch (4 vs 1); now it trains, the position
    embeddings included (exactness against the one-example reference: tests/engine/test_batch_count.py)."""
    from ghostdp.integrations.hf.trainer import DPTrainer

    model = bert_cls(2).train()
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1, 40, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist(),
             "labels": i % 2} for i in range(12)]

    def collate(items):
        T = max(len(r["input_ids"]) for r in items)
        ids = torch.zeros(len(items), T, dtype=torch.long)
        mask = torch.zeros(len(items), T, dtype=torch.long)
        for i, r in enumerate(items):
            ids[i, :len(r["input_ids"])], mask[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["labels"] for r in items])}

    trainer = DPTrainer(model=model, args=make_args(tmp_path, max_steps=3), train_dataset=rows, data_collator=collate)
    assert trainer._task == "sequence_classification"
    pos = model.bert.embeddings.position_embeddings.weight
    before = pos.detach().clone()
    trainer.train()
    assert trainer.privacy_engine.steps == 3
    assert not torch.equal(pos.detach(), before)


def test_labels_outside_the_heads_classes_are_refused_with_the_cause():
    """New-user report: a causal-LM collator's token ids fed to a token-classification head crashed with a bare
    IndexError from cross_entropy; the loss now names the mismatch (and -100 stays ignored)."""
    from ghostdp.engine.loss import per_example_sequence_loss, per_example_token_loss

    logits = torch.zeros(2, 3, 4)
    ok = torch.tensor([[0, 3, -100], [-100, -100, -100]])
    assert per_example_token_loss(logits, ok).shape == (2,)
    with pytest.raises(ValueError, match=r"class ids in \[0, 4\).*from 0 to 26.*collator"):
        per_example_token_loss(logits, torch.tensor([[0, 26, -100], [1, 2, 3]]))
    with pytest.raises(ValueError, match=r"class ids in \[0, 4\).*from -1 to 1"):
        per_example_sequence_loss(torch.zeros(2, 4), torch.tensor([1, -1]))

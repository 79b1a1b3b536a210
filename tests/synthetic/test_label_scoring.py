"""The DP generator's label likelihood ratio: margins, the zero-shot classifier, the synthesis filter (exact
counts, acceptance rates, no private data read), and the extra evaluation rows (issue 11)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostdp.integrations.hf.collators import (
    IGNORE_INDEX,
    CollatorConfig,
    PrefixLMCollator,
)
from ghostdp.integrations.synthetic.config import SynthesizeConfig
from ghostdp.integrations.synthetic.label_scoring import (
    TOKENS_PER_BATCH,
    LabelScorer,
    MarginFilter,
    filter_section,
    generation_budget,
    generator_classifier_metrics,
    margins,
)
from ghostdp.integrations.synthetic.synthesize import read_synthetic, synthesize
from tests.helpers import tiny_llama

LABELS = ("negative", "positive")
POS = "good great wonderful superb".split()
NEG = "bad awful dull boring".split()
FILLER = "the film movie plot".split()
WORDS = POS + NEG + FILLER + ["[", "][", "]:", "sst2", "negative", "positive"]
MODEL_INFO = {"model_id": "test-model", "base_model": "tiny", "privacy": None, "data": None}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _text(rng: random.Random, label: str) -> str:
    words = rng.choices(FILLER, k=2) + rng.choices(POS if label == "positive" else NEG, k=2)
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def tokenizer(make_word_tokenizer):
    return make_word_tokenizer(WORDS, pad=True)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return PrefixLMCollator(tokenizer, CollatorConfig(max_length=12))


@pytest.fixture(scope="module")
def separable_model(tokenizer, collator):
    """A tiny Llama trained (non-privately, it is a test fixture) until "positive" texts use POS words and
    "negative" texts NEG words: its two labels are trivially separable by likelihood."""
    rng = random.Random(0)
    rows = [{"text": _text(rng, lb), "label": lb} for _ in range(32) for lb in LABELS]
    model = tiny_llama(True, vocab=len(tokenizer), dtype=torch.float32, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    batch = collator(rows)
    model.train()
    for _ in range(60):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Margins and log-likelihoods
# ----------------------------------------------------------------------------------------------------


def test_margins_by_hand():
    ll = np.array([[-1.0, -3.0], [-5.0, -2.0]])
    assert margins(ll, [0, 0]).tolist() == [2.0, -3.0]
    assert margins(ll, [1, 1]).tolist() == [-2.0, 3.0]
    three = np.array([[-1.0, -4.0, -2.0]])  # own label 2: -2 - max(-1, -4) = -1; own label 0: -1 - (-2) = 1
    assert margins(three, [2]).tolist() == [-1.0] and margins(three, [0]).tolist() == [1.0]
    with pytest.raises(ValueError, match="K >= 2"):
        margins(np.zeros((3, 1)), [0, 0, 0])


def test_log_likelihoods_match_the_training_loss_and_ignore_batching(separable_model, tokenizer, collator):
    """ll(x, y) is minus the summed training loss of the row prefix(y) + x + EOS, one row or in a batch."""
    texts = ["good film", "the plot was", "awful dull boring movie", "superb"]
    scorer = LabelScorer(separable_model, collator, LABELS, batch_size=3)
    ll = scorer.log_likelihoods(texts)  # (4, 2)
    assert ll.shape == (4, 2) and (ll < 0).all()
    with torch.no_grad():
        for k, label in enumerate(LABELS):
            batch = collator([{"text": t, "label": label} for t in texts])
            logits = separable_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                                  reduction="none").sum(1)
            np.testing.assert_allclose(ll[:, k], -nll.numpy(), rtol=1e-5, atol=1e-4)
    one_by_one = np.vstack([LabelScorer(separable_model, collator, LABELS, batch_size=1).log_likelihoods([t])
                            for t in texts])
    np.testing.assert_allclose(ll, one_by_one, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_peft_generators_score_what_their_training_forward_scores(method, separable_model, collator):
    """Both run the label prefix once from the cache (prompt tuning: the base model after the virtual tokens,
    which PEFT's forward prepends); both equal minus the summed training loss of prefix(y) + x + EOS."""
    import copy

    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from ghostdp.integrations.synthetic.synthesize import caches_prefix

    torch.manual_seed(4)
    config = (LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
              if method == "lora" else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    model = get_peft_model(copy.deepcopy(separable_model), config).eval()
    assert caches_prefix(model)
    texts = ["good film", "awful dull boring movie the plot", "superb"]
    ll = LabelScorer(model, collator, LABELS, batch_size=2).log_likelihoods(texts)
    with torch.no_grad():
        for k, label in enumerate(LABELS):
            batch = collator([{"text": t, "label": label} for t in texts])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, -batch["input_ids"].shape[1]:]  # prompt tuning: drop the virtual tokens' positions
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                                  reduction="none").sum(1)
            np.testing.assert_allclose(ll[:, k], -nll.numpy(), rtol=1e-5, atol=1e-4)


def test_a_model_without_a_cache_scores_prefix_and_text_whole_with_the_same_result(separable_model, collator):
    import copy

    from ghostdp.integrations.synthetic.synthesize import caches_prefix

    uncached = copy.deepcopy(separable_model)
    uncached.config.use_cache = False
    assert caches_prefix(separable_model) and not caches_prefix(uncached)
    texts = ["good film", "awful dull boring movie the plot", "superb", "the"]
    np.testing.assert_allclose(LabelScorer(uncached, collator, LABELS, batch_size=3).log_likelihoods(texts),
                               LabelScorer(separable_model, collator, LABELS, batch_size=3).log_likelihoods(texts),
                               rtol=1e-5, atol=1e-4)


def test_every_label_scores_the_same_cut_text_without_eos(separable_model, tokenizer, collator):
    """A text longer than the budget is cut to the same tokens under each label, and gets no EOS."""
    scorer = LabelScorer(separable_model, collator, LABELS, max_text_tokens=3)
    ids = scorer._text_ids(["good great film plot movie", "bad"])
    assert ids[0] == tokenizer("good great film", add_special_tokens=False)["input_ids"]  # cut: no EOS
    assert ids[1][-1] == collator.eos_token_id  # fit whole: EOS scored
    assert generation_budget(collator, LABELS) == 12 - len(collator.prefix_ids("negative"))


def test_generator_as_classifier_separates_trivially_separable_labels(separable_model, collator):
    rng = random.Random(5)
    labels = [LABELS[i % 2] for i in range(40)]
    texts = [_text(rng, lb) for lb in labels]

    class Gen:  # the fields of synthesize.LoadedGenerator the classifier reads
        model, label_names, device = separable_model, LABELS, torch.device("cpu")

    Gen.collator = collator
    metrics = generator_classifier_metrics(Gen, texts, labels)
    assert metrics["accuracy"] == 1.0 and metrics["recall"] == {"negative": 1.0, "positive": 1.0}
    assert metrics["recall_gap"] == 0.0 and metrics["n_eval"] == 40
    # The untrained model of the same shape does not separate them: the signal comes from training.
    Gen.model = tiny_llama(True, vocab=separable_model.config.vocab_size, dtype=torch.float32, seed=1).eval()
    assert generator_classifier_metrics(Gen, texts, labels)["accuracy"] < 0.8


# ----------------------------------------------------------------------------------------------------
# The filter inside synthesis
# ----------------------------------------------------------------------------------------------------


class ScriptedLM(nn.Module):
    """Emits texts drawn with the seeded global RNG from ``choices`` (token-id lists), then EOS."""

    def __init__(self, choices: list[list[int]], eos: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.choices, self.eos = choices, eos

    def generate(self, input_ids, attention_mask, generation_config):
        width = max(len(c) for c in self.choices) + 1
        rows = []
        for _ in range(input_ids.shape[0]):
            c = self.choices[int(torch.randint(len(self.choices), (1,)))]
            rows.append(c + [self.eos] * (width - len(c)))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def test_filter_keeps_exact_counts_of_samples_scored_as_their_label(tmp_path, separable_model, tokenizer,
                                                                    collator):
    """A generator that writes positive and negative texts for either label: the filter keeps, per label,
    exactly the target count, all of them scored as that label, and records the acceptance rates."""
    rng = random.Random(1)
    texts = sorted({_text(rng, lb) for _ in range(40) for lb in LABELS})
    gen = ScriptedLM([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], collator.eos_token_id)
    flt = MarginFilter(LabelScorer(separable_model, collator, LABELS), threshold=1.0)
    cfg = SynthesizeConfig(num_samples=6, per_label=True, gen_batch_size=4, max_batches_factor=10)
    res = synthesize(gen, tokenizer, collator, LABELS, cfg, tmp_path, targets={"negative": 5, "positive": 7},
                     model_info=MODEL_INFO, show_progress=False, sample_filter=flt)
    assert res.complete and res.counts == {"negative": 5, "positive": 7}
    rows = read_synthetic(res.jsonl)
    assert len(rows) == 12
    for r in rows:
        assert r["margin"] > 1.0
        own = POS if r["label"] == "positive" else NEG
        assert any(w in own for w in r["text"].split())
    meta = json.loads(res.meta.read_text())
    f = meta["filter"]
    assert f["threshold"] == 1.0 and "costs no privacy" in f["privacy"]
    for label in LABELS:
        c = f["counts"][label]
        assert c["accepted"] == res.counts[label] and c["scored"] > c["accepted"]  # half the candidates are wrong
        assert f["acceptance_rate"][label] == pytest.approx(c["accepted"] / c["scored"])
    assert meta["stats"]["rejected"] == sum(f["counts"][lb]["scored"] - f["counts"][lb]["accepted"] for lb in LABELS)
    assert meta["sampling"]["max_new_tokens"] == generation_budget(collator, LABELS)  # none -> the training budget
    section = filter_section(f)
    assert "costs no privacy" in section and "| positive |" in section
    # Resuming with another threshold is another filter: refused, like other sampling changes.
    from ghostdp.integrations.synthetic.synthesize import ResumeMismatchError

    with pytest.raises(ResumeMismatchError):
        synthesize(gen, tokenizer, collator, LABELS, cfg, tmp_path, targets={"negative": 6, "positive": 7},
                   model_info=MODEL_INFO, show_progress=False,
                   sample_filter=MarginFilter(flt.scorer, threshold=2.0))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_filtered_synthesis_reads_no_private_data(tmp_path, make_word_tokenizer):
    """Train a tiny generator with `ghostdp train`, then delete the private data and the run's private/ folder:
    `ghostdp synthesize --filter-margin` still completes, so the filter uses the DP model alone."""
    from ghostdp.cli import main

    rng = random.Random(0)
    for name, n in (("train.tsv", 48), ("dev.tsv", 16)):
        rows = [(i % 2, _text(rng, LABELS[i % 2])) for i in range(n)]
        _write(tmp_path / name, "label\tsentence\n" + "".join(f"{y}\t{t}\n" for y, t in rows))
    tok = make_word_tokenizer(WORDS, pad=True)
    model = tiny_llama(True, vocab=len(tok), dtype=torch.float32)
    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = _write(tmp_path / "tiny.toml", f"""
[data]
train_data = "{tmp_path / 'train.tsv'}"
eval_data = "{tmp_path / 'dev.tsv'}"
text_column = "sentence"
label_names = {{ "0" = "negative", "1" = "positive" }}

[train]
model = "{tmp_path / 'tiny'}"
lora_targets = ["q_proj", "v_proj"]
logical_batch_size = 16
physical_batch_size = 8
max_steps = 1
max_length = 12
label_epsilon = 0.5
dp_seed = 1
use_cpu = true

[synthesize]
num_samples = 10
gen_batch_size = 8
temperature = 2.0
""")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--run-dir", str(run), "--no-progress"]) == 0
    for private in (tmp_path / "train.tsv", tmp_path / "dev.tsv"):
        private.unlink()
    shutil.rmtree(run / "private")
    assert main(["synthesize", "--run-dir", str(run), "--filter-margin", "-0.5", "--no-progress"]) == 0
    meta = json.loads((run / "synthetic" / "synthetic_meta.json").read_text())
    assert meta["complete"] and sum(meta["counts"].values()) == 10
    f = meta["filter"]
    assert sum(c["accepted"] for c in f["counts"].values()) == 10
    assert all(r is None or 0 < r <= 1 for r in f["acceptance_rate"].values())
    rows = read_synthetic(run / "synthetic" / "synthetic.jsonl")
    assert all(r["margin"] > -0.5 for r in rows)


def test_default_batch_follows_the_text_budget_and_changes_no_score(separable_model, collator):
    texts = [f"{w} {w}" for w in ("good", "bad", "great", "awful", "fine")]
    auto = LabelScorer(separable_model, collator, LABELS)
    assert auto.batch_size == max(1, min(64, TOKENS_PER_BATCH // auto.text_budget))
    assert LabelScorer(separable_model, collator, LABELS, max_text_tokens=TOKENS_PER_BATCH).batch_size == 1
    assert LabelScorer(separable_model, collator, LABELS, max_text_tokens=1).batch_size == 64
    np.testing.assert_allclose(auto.log_likelihoods(texts),
                               LabelScorer(separable_model, collator, LABELS, batch_size=1).log_likelihoods(texts),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size=0"):
        LabelScorer(separable_model, collator, LABELS, batch_size=0)


class _FixedMargins:
    """A scorer stand-in whose margin for a text is the number written in it."""

    text_budget = 5

    def margins(self, texts, labels):
        return np.array([float(t) for t in texts])


@pytest.mark.parametrize(("fraction", "threshold", "kept"), [
    (1.0, 0.0, {0, 2, 3, 4, 6}),  # every candidate above the threshold, as before the option existed
    (0.4, 0.0, {0, 3, 4}),        # the ceil(0.4 * 7) = 3 largest: 5, 3 and the earlier of the two 2s
    (0.4, 2.5, {0, 4}),           # of those, only the ones above the threshold
    (0.2, -10.0, {0, 4}),         # ceil(0.2 * 7) = 2; the threshold does not bind
])
def test_top_fraction_keeps_the_largest_margins_of_each_batch(fraction, threshold, kept):
    texts = ["3", "-1", "1", "2", "5", "0", "2"]
    flt = MarginFilter(_FixedMargins(), threshold=threshold, top_fraction=fraction)
    verdicts = flt("positive", texts)
    assert [m for _, m in verdicts] == [float(t) for t in texts]
    assert {i for i, (keep, _) in enumerate(verdicts) if keep} == kept
    info = flt.describe()
    assert ("top_fraction" in info) == (fraction < 1) and info.get("top_fraction", 1.0) == fraction


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan")])
def test_top_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match="top_fraction"):
        MarginFilter(_FixedMargins(), top_fraction=fraction)
    with pytest.raises(ValueError, match="filter_top_fraction"):
        SynthesizeConfig(filter_margin=0.0, filter_top_fraction=fraction)


def test_top_fraction_needs_the_filter():
    with pytest.raises(ValueError, match="filter_margin"):
        SynthesizeConfig(filter_top_fraction=0.5)
    assert SynthesizeConfig(filter_top_fraction=1.0).filter_margin is None


def test_top_fraction_synthesis_keeps_exact_counts_and_the_best_half(tmp_path, separable_model, tokenizer,
                                                                      collator):
    """With top_fraction 0.5 the set still has exactly the target counts; at most half of each batch's candidates
    are accepted, each kept sample's margin is at least its batch's median, and the rule is in the metadata;
    resuming with another fraction is another filter (refused)."""
    from ghostdp.integrations.synthetic.synthesize import ResumeMismatchError

    rng = random.Random(2)
    texts = sorted({_text(rng, lb) for _ in range(60) for lb in LABELS})
    gen = ScriptedLM([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], collator.eos_token_id)
    scorer = LabelScorer(separable_model, collator, LABELS)
    cfg = SynthesizeConfig(num_samples=6, per_label=True, gen_batch_size=6, max_batches_factor=3,
                           filter_margin=-1e9, filter_top_fraction=0.5)
    targets = {"negative": 7, "positive": 9}
    res = synthesize(gen, tokenizer, collator, LABELS, cfg, tmp_path, targets=targets, model_info=MODEL_INFO,
                     show_progress=False, sample_filter=MarginFilter(scorer, -1e9, 0.5))
    assert res.complete and res.counts == targets
    meta = json.loads(res.meta.read_text())
    assert meta["filter"]["top_fraction"] == 0.5 and "top_fraction" in meta["filter"]["rule"]
    rows = read_synthetic(res.jsonl)
    per_batch = Counter((r["label"], r["batch"]) for r in rows)
    assert max(per_batch.values()) <= 3  # ceil(0.5 * 6) of each batch of 6
    for r in rows:  # the margin the filter recorded is the scorer's
        assert r["margin"] == pytest.approx(float(scorer.margins([r["text"]], [r["label"]])[0]), abs=1e-3)
    # The same seeds without the fraction keep whatever comes (the threshold does not bind): about half of the
    # candidates carry the other label's words, and the fraction keeps fewer of those.
    plain = synthesize(gen, tokenizer, collator, LABELS, replace(cfg, filter_top_fraction=1.0), tmp_path / "plain",
                       targets=targets, model_info=MODEL_INFO, show_progress=False,
                       sample_filter=MarginFilter(scorer, -1e9))
    right = [sum(r["margin"] > 0 for r in read_synthetic(x.jsonl)) for x in (res, plain)]
    assert right[0] > right[1]
    assert "top fraction 0.5" in filter_section(meta["filter"])
    with pytest.raises(ResumeMismatchError, match="top_fraction"):
        synthesize(gen, tokenizer, collator, LABELS, cfg, tmp_path, targets=targets, model_info=MODEL_INFO,
                   show_progress=False, sample_filter=MarginFilter(scorer, -1e9, 0.25))


def test_the_batch_cap_grows_with_the_share_a_batch_can_keep(tmp_path, separable_model, tokenizer, collator):
    """max_batches_factor counts the batches a label needs at the kept share: with top_fraction 0.5 a batch of 6
    keeps at most 3, so 7 samples need 3 batches, which max_batches_factor 1 (2 batches of 6 at the full share)
    must still allow."""
    texts = [f"{a} {b}" for a in FILLER for b in POS + NEG]  # 32 distinct texts
    gen = ScriptedLM([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], collator.eos_token_id)
    cfg = SynthesizeConfig(num_samples=7, per_label=True, gen_batch_size=6, max_batches_factor=1.0,
                           filter_margin=-1e9, filter_top_fraction=0.5, dedup=False)
    res = synthesize(gen, tokenizer, collator, LABELS, cfg, tmp_path, targets={"negative": 7, "positive": 7},
                     model_info=MODEL_INFO, show_progress=False,
                     sample_filter=MarginFilter(LabelScorer(separable_model, collator, LABELS), -1e9, 0.5))
    assert res.complete and res.counts == {"negative": 7, "positive": 7}
    assert {r["batch"] for r in read_synthetic(res.jsonl)} == {0, 1, 2}

"""The app on long texts from another domain (issue 11, "a second dataset in the tests' reach").

One tiny run of ``ghostdp pipeline`` (train -> synthesize -> evaluate, through the CLI) on a CSV of long toy
reviews (``tests.helpers.toy_long_review_rows``: 200-400 words in paragraphs, restaurant words, some rows
with their sentiment words only after word 50) plus a few short rows, with non-SST-2 columns
(``review_id,sentiment,review``), string labels ``neg``/``pos`` named ``negative``/``very positive`` (two
prefixes of different token counts, as a subword tokenizer gives) and ``max_length`` 24. The checks derive
each expected value here, from the word tokenizer's rule (``\\w+|[^\\w\\s]+``, then the vocabulary), not from
the app's code:

* the CSV's quoted multi-line fields are read whole;
* a training row longer than ``max_length`` is its prefix plus its first text tokens, with no EOS; a row
  that fits ends with EOS (every batch training drew, and the collator over every private row);
* the generation budget (``max_new_tokens`` none) is ``max_length`` minus the shortest label prefix, and no
  synthetic (or floor) sample is longer;
* the "real, same count and length cap" row cuts the real texts to that same cap, as many per label as
  the synthetic set has, and the cut visibly drops the signal of the late rows;
* the label scorer cuts long texts to ``max_length`` minus the longest prefix and adds EOS only to texts
  that fit (log-likelihoods against a one-row-at-a-time forward);
* the report's length table and ``lengths.png`` put the real held-out lengths (the ORIGINAL long texts,
  hundreds of words; ``metrics.lengths`` adds the private originals) beside the synthetic ones.
"""
from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ghostdp.cli import main
from tests.helpers import (
    LATE_SIGNAL_START,
    LONG_VOCAB,
    NEG,
    POS,
    save_tiny_generator,
    toy_long_review_rows,
    write_review_csv,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LENGTH = 24
LABEL_NAMES = {"neg": "negative", "pos": "very positive"}
PREFIX_WORDS = {name: ["[", "reviews", "]["] + name.split() + ["]:"] for name in LABEL_NAMES.values()}  # 5 and 6
BUDGET = MAX_LENGTH - min(len(p) for p in PREFIX_WORDS.values())  # new tokens of a sample: 19
SCORER_BUDGET = MAX_LENGTH - min(len(p) for p in PREFIX_WORDS.values())  # = the generation budget: 19
N_SYNTHETIC = 24

TOML = """
[data]
train_data = "{root}/train.csv"
eval_data = "{root}/dev.csv"

[train]
model = "{root}/tiny"
lora_targets = ["q_proj", "v_proj"]
logical_batch_size = 16
physical_batch_size = 8
max_steps = 2
label_epsilon = 0.5
dp_seed = 1
use_cpu = true

[synthesize]
num_samples = {n}
gen_batch_size = 8

[evaluate]
dp_steps = 5
dp_batch_size = 16
floor_samples = 8
perplexity_rows = 6
"""


def _words(text: str) -> list[str]:
    """The word tokenizer's pieces (``pre_tokenizers.Whitespace``: ``\\w+|[^\\w\\s]+``)."""
    return re.findall(r"\w+|[^\w\s]+", text)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory, make_word_tokenizer):
    """The tiny pipeline run on the long-review CSV, with what training's collator produced and what the
    evaluation was given recorded on the way (the app's code runs unchanged)."""
    from ghostdp.integrations.hf.collators import PrefixLMCollator
    from ghostdp.integrations.synthetic import evaluate as evaluate_module

    root = tmp_path_factory.mktemp("long")
    rng = random.Random(0)
    train = toy_long_review_rows(40, rng) + toy_long_review_rows(8, rng, words=(3, 8))  # 8 short rows fit whole
    rng.shuffle(train)
    dev = toy_long_review_rows(24, random.Random(1))
    write_review_csv(root / "train.csv", train)
    write_review_csv(root / "dev.csv", dev)
    save_tiny_generator(root / "tiny", make_word_tokenizer, LONG_VOCAB)
    (root / "run.toml").write_text(TOML.format(root=root, n=N_SYNTHETIC), encoding="utf-8")

    batches, seen = [], {}
    collate, evaluate_synthetic = PrefixLMCollator.__call__, evaluate_module.evaluate_synthetic

    def spy_collate(self, examples):
        out = collate(self, examples)
        batches.append((self.config.max_length, [dict(e) for e in examples], {k: v.clone() for k, v in out.items()}))
        return out

    def spy_evaluate(**kwargs):
        seen.update(kwargs)
        return evaluate_synthetic(**kwargs)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(PrefixLMCollator, "__call__", spy_collate)
            mp.setattr(evaluate_module, "evaluate_synthetic", spy_evaluate)
            code = main(["pipeline", "--config", str(root / "run.toml"), "--run-dir", str(root / "run"),
                         "--text-column", "review", "--label-column", "sentiment",
                         "--label-names", ",".join(f"{k}={v}" for k, v in LABEL_NAMES.items()),
                         "--dataset-name", "reviews", "--max-length", str(MAX_LENGTH), "--max-new-tokens", "none",
                         "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    vocab = make_word_tokenizer(LONG_VOCAB, pad=True).get_vocab()
    return SimpleNamespace(root=root, run=root / "run", train=train, dev=dev, batches=batches, seen=seen,
                           vocab=vocab, eos=vocab["<eos>"])


def _ids(run, words: list[str]) -> list[int]:
    return [run.vocab.get(w, run.vocab["<unk>"]) for w in words]


def _expected_row(run, text: str, label: str) -> tuple[list[int], int, bool]:
    """(ids, prefix length, cut) of the training row of ``text``: prefix + text + EOS if that fits in
    MAX_LENGTH, else prefix + the first MAX_LENGTH - len(prefix) text tokens and no EOS."""
    prefix, words = _ids(run, PREFIX_WORDS[label]), _ids(run, _words(text))
    if len(prefix) + len(words) + 1 <= MAX_LENGTH:
        return prefix + words + [run.eos], len(prefix), False
    return prefix + words[: MAX_LENGTH - len(prefix)], len(prefix), True


def test_the_csv_with_long_quoted_multiline_fields_is_read_whole(long_run):
    private, heldout = long_run.seen["private"], long_run.seen["heldout"]
    assert private.texts == tuple(t for _, t in long_run.train) and heldout.texts == tuple(t for _, t in long_run.dev)
    assert private.labels == tuple(LABEL_NAMES[y] for y, _ in long_run.train)
    assert private.label_names == heldout.label_names == ("negative", "very positive")
    assert sum("\n\n" in t and '"' in t and "," in t for t in private.texts) >= 30  # what the CSV had to quote
    assert min(len(t.split()) for t in heldout.texts) >= 200


def test_training_rows_are_cut_without_eos_and_rows_that_fit_end_with_eos(long_run):
    """Every row of every batch DP training drew (the Poisson batches of 2 steps), then the run's collator
    over all 48 private rows."""
    from ghostdp.integrations.synthetic.synthesize import load_generator

    trained = [(ex, {k: v[i] for k, v in out.items()}) for length, exs, out in long_run.batches
               if length == MAX_LENGTH for i, ex in enumerate(exs)]
    kinds = Counter()
    for ex, row in trained:
        ids, n_prefix, cut = _expected_row(long_run, ex["text"], ex["label"])
        n = int(row["attention_mask"].sum())
        assert row["input_ids"][:n].tolist() == ids and n <= MAX_LENGTH
        assert row["labels"][:n_prefix].eq(-100).all() and row["labels"][n_prefix:n].tolist() == ids[n_prefix:]
        assert (row["input_ids"][n - 1] == long_run.eos) is not cut  # the last scored token: EOS iff it fit
        kinds[cut] += 1
    assert kinds[True] >= 10 and kinds[False] >= 1, kinds

    gen = load_generator(long_run.run / "model", use_cpu=True)
    encoded = gen.collator.encode(long_run.seen["private"].examples())
    for (y, text), e in zip(long_run.train, encoded):
        ids, n_prefix, cut = _expected_row(long_run, text, LABEL_NAMES[y])
        assert (list(e.input_ids), e.n_prefix, e.truncated) == (ids, n_prefix, cut)
    assert sum(e.truncated for e in encoded) == 40  # the 40 long rows; the 8 short ones fit


def test_generation_budget_is_max_length_minus_the_shortest_prefix(long_run):
    from ghostdp.integrations.synthetic.synthesize import read_synthetic

    for folder in ("synthetic", "floor"):
        meta = json.loads((long_run.run / folder / "synthetic_meta.json").read_text())
        assert meta["prefix_ids"] == {name: _ids(long_run, words) for name, words in PREFIX_WORDS.items()}
        assert meta["sampling"]["max_new_tokens"] == BUDGET == 19
        rows = read_synthetic(long_run.run / folder / "synthetic.jsonl")
        assert rows and max(len(_words(r["text"])) for r in rows) <= BUDGET
    assert sum(meta["counts"].values()) == 8  # the floor's; the synthetic set's:
    assert len(long_run.seen["synthetic"]) == N_SYNTHETIC


def test_real_matched_cuts_the_real_texts_to_the_synthetic_cap(long_run):
    synthetic, private = long_run.seen["synthetic"], long_run.seen["private"]
    matched = long_run.seen["extra_train_sets"]["real_matched"]
    assert Counter(matched.labels) == Counter(synthetic.labels)  # as many rows per label as the synthetic set
    def cut(text: str) -> str:  # a text of at most BUDGET tokens stays as it is
        return text if len(_words(text)) <= BUDGET else " ".join(_words(text)[:BUDGET])

    cut_private = {name: Counter(cut(t) for t, y in zip(private.texts, private.labels) if y == name)
                   for name in private.label_names}
    for name in private.label_names:  # each one a distinct private row of its label, cut to BUDGET tokens
        chosen = Counter(t for t, y in zip(matched.texts, matched.labels) if y == name)
        assert not chosen - cut_private[name], (name, chosen - cut_private[name])
    assert max(len(_words(t)) for t in matched.texts) == BUDGET  # hundreds of words in, BUDGET tokens out
    assert max(len(_words(t)) for t in synthetic.texts) <= BUDGET

    # The cap drops the signal of the rows whose sentiment words come late: visible in the data.
    sentiment = set(POS) | set(NEG)
    late = [t for t in private.texts if not sentiment & set(t.split()[:LATE_SIGNAL_START])]
    assert len(late) >= 10 and all(sentiment & set(_words(t)) for t in late)
    assert all(not sentiment & set(_words(t)[:BUDGET]) for t in late)

    metrics = json.loads((long_run.run / "metrics.json").read_text())
    assert metrics["accuracy"]["real_matched"]["n_train"] == len(matched) == N_SYNTHETIC


def test_label_scorer_cuts_long_texts_to_its_budget_and_adds_eos_only_when_they_fit(long_run):
    import torch.nn.functional as F

    from ghostdp.integrations.synthetic.label_scoring import LabelScorer
    from ghostdp.integrations.synthetic.synthesize import load_generator

    gen = load_generator(long_run.run / "model", use_cpu=True)
    scorer = LabelScorer(gen.model, gen.collator, gen.label_names, batch_size=3)
    # Every sample the generator can produce (up to the generation budget) is scored whole under each label.
    assert scorer.text_budget == SCORER_BUDGET == 19
    long_text = long_run.dev[0][1]
    head = _words(long_text)[:SCORER_BUDGET]
    texts = [long_text, " ".join(head + ["food"] * 30),  # same first 19 tokens, another tail
             " ".join(head[:-1]),  # 18 tokens: text and EOS fit in the 19, so it gets EOS
             " ".join(head),  # exactly 19: where generation stops without EOS (a cut text), so no EOS
             "good food ."]
    ll = scorer.log_likelihoods(texts)

    def reference(text: str, label: str) -> float:
        words = _ids(long_run, _words(text))
        scored = words[:SCORER_BUDGET] if len(words) >= SCORER_BUDGET else words + [long_run.eos]
        prefix = _ids(long_run, PREFIX_WORDS[label])
        ids = torch.tensor([prefix + scored])
        with torch.no_grad():
            logp = F.log_softmax(gen.model(input_ids=ids).logits[0, :-1].double(), dim=-1)
        return float(sum(logp[t - 1, ids[0, t]] for t in range(len(prefix), ids.shape[1])))

    want = [[reference(t, name) for name in gen.label_names] for t in texts]
    np.testing.assert_allclose(ll, want, rtol=1e-5, atol=1e-4)
    assert ll[0].tolist() == pytest.approx(ll[1].tolist(), abs=1e-5)  # the tail past the budget is not read
    assert ll[3].tolist() == pytest.approx(ll[0].tolist(), abs=1e-5)
    # (ll[2]: the reference above scores its 18 tokens plus EOS; ll[3] equals the long text's: cut, no EOS.)

    metrics = json.loads((long_run.run / "metrics.json").read_text())
    assert metrics["accuracy"]["generator_classifier"]["n_eval"] == len(long_run.dev)


def test_report_shows_real_lengths_of_the_long_originals_beside_the_synthetic_ones(long_run):
    """The report's ``real`` lengths are the held-out texts as read (not cut); ``metrics.lengths`` also has
    the private originals, while the synthetic samples stay within the budget."""
    def stats(texts):
        n = [len(t.split()) for t in texts]
        return {"n": len(n), "mean": pytest.approx(statistics.fmean(n)), "median": pytest.approx(statistics.median(n)),
                "max": max(n)}

    run = long_run.run
    figures = json.loads((run / "metrics.json").read_text())
    lengths = figures["lengths"]
    assert set(lengths) == {"real", "synthetic"}
    real = {k: v for k, v in lengths["real"].items() if k != "p90"}
    assert real == stats([t for _, t in long_run.dev]) and lengths["real"]["mean"] > 200
    assert lengths["synthetic"]["n"] == N_SYNTHETIC and lengths["synthetic"]["max"] <= BUDGET
    other = figures["metrics"]["lengths"]
    assert {k: v for k, v in other["private"].items() if k != "p90"} == stats([t for _, t in long_run.train])
    assert other["heldout"] == lengths["real"] and other["synthetic"] == lengths["synthetic"]

    report = (run / "report.md").read_text()
    table = report.split("## Text lengths (words)", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^\| real \| 24 \| ", table, re.MULTILINE)
    assert re.search(rf"^\| synthetic \| {N_SYNTHETIC} \| ", table, re.MULTILINE)
    assert "![lengths](lengths.png)" in table and (run / "lengths.png").stat().st_size > 0


def test_the_run_completes_with_its_report_and_metrics(long_run):
    run = long_run.run
    for name in ("report.md", "metrics.json", "accuracy.png", "lengths.png", "synthetic/synthetic.csv",
                 "model/ghostdp_model.json"):
        assert (run / name).is_file(), name
    figures = json.loads((run / "metrics.json").read_text())
    acc = figures["accuracy"]
    for key in ("synthetic", "real_ceiling", "dp_on_real", "prior_floor", "real_matched", "generator_classifier"):
        assert acc[key] is not None and 0 <= acc[key]["accuracy"] <= 1, key
    info = json.loads((run / "model" / "ghostdp_model.json").read_text())
    assert info["label_names"] == ["negative", "very positive"] and info["max_length"] == MAX_LENGTH
    assert info["dataset_name"] == "reviews"
    assert figures["metrics"]["data"]["n_private"] == 48 and figures["metrics"]["data"]["n_heldout"] == 24


@pytest.mark.parametrize("suffix", ["csv", "tsv"])
def test_a_text_longer_than_the_csv_modules_field_limit_is_read_whole(tmp_path, suffix):
    """Regression: Python's csv refuses fields over 128 KiB by default, which sank a whole file holding one
    long document ("field larger than field limit (131072)"). Read whole now; the module's limit is restored."""
    import csv

    from ghostdp.integrations.synthetic.text_data import (
        TextDataConfig,
        load_labelled_texts,
    )

    document = "\n\n".join(" ".join(random.Random(i).choices(POS + NEG, k=5000)) for i in range(5))  # ~150k chars
    assert len(document) > 131072
    if suffix == "csv":
        path = write_review_csv(tmp_path / "long.csv", [("pos", document), ("neg", "bad food .")])
    else:  # TSV has no quoting: one line a row
        document = document.replace("\n\n", " ")
        path = tmp_path / "long.tsv"
        path.write_text(f"review_id\tsentiment\treview\n0\tpos\t{document}\n1\tneg\tbad food .\n", encoding="utf-8")
    before = csv.field_size_limit()
    data = load_labelled_texts(TextDataConfig(path, text_column="review", label_column="sentiment"))
    assert data.texts == (document, "bad food .") and data.labels == ("pos", "neg")
    assert csv.field_size_limit() == before

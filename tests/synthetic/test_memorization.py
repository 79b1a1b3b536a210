"""Memorisation checks: longest common word n-gram (against brute force) and embedding neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from ghostdp.integrations.synthetic.memorization import NgramIndex, memorization_report, nearest_neighbours, word_tokens

PRIVATE = [
    "the film is a charming , often affecting journey",
    "an utterly forgettable sequel with no wit",
    "hide new secretions from the parental units",
    "it 's a masterpiece of quiet , unsentimental observation about grief and family",
    "flat , dull and far too long",
]


def brute_longest(query: list[str], corpus: list[list[str]]) -> int:
    best = 0
    for doc in corpus:
        for i in range(len(query)):
            for j in range(len(doc)):
                k = 0
                while i + k < len(query) and j + k < len(doc) and query[i + k] == doc[j + k]:
                    k += 1
                best = max(best, k)
    return best


def test_word_tokens():
    assert word_tokens("It's GREAT, really!") == ["it", "s", "great", "really"]


def test_index_matches_brute_force_on_random_texts():
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(5)]  # small vocabulary: many repeats, many clones in the automaton
    private = [" ".join(rng.choice(vocab, size=rng.integers(1, 12))) for _ in range(40)]
    queries = [" ".join(rng.choice(vocab + ["zz"], size=rng.integers(0, 15))) for _ in range(300)]
    index = NgramIndex(private)
    corpus = [word_tokens(t) for t in private]
    for q in queries:
        tokens = word_tokens(q)
        n, src, end = index.longest_match(tokens)
        assert n == brute_longest(tokens, corpus), q
        if n:
            span = tokens[end - n:end]
            doc = corpus[src]
            assert any(doc[j:j + n] == span for j in range(len(doc) - n + 1))  # the named text holds it
        else:
            assert src == -1


def test_no_match_across_text_boundaries():
    index = NgramIndex(["a b", "c d"])
    assert index.longest_match(["b", "c"])[0] == 1
    assert index.longest_match(["c", "d"]) == (2, 1, 2)


def test_planted_verbatim_copy_is_found():
    synthetic = [
        "a wonderful and moving picture",
        "it 's a masterpiece of quiet , unsentimental observation about grief and family",  # PRIVATE[3]
        "an utterly forgettable movie",
        "nothing in common here",
    ]
    rng = np.random.default_rng(1)
    priv_emb = rng.normal(size=(len(PRIVATE), 32))
    syn_emb = rng.normal(size=(len(synthetic), 32))
    syn_emb[1] = 3.0 * priv_emb[3]  # same direction: cosine 1
    report = memorization_report(
        synthetic, PRIVATE, synthetic_embeddings=syn_emb, private_embeddings=priv_emb, top_k=2, show_progress=False
    )
    full = len(word_tokens(synthetic[1]))
    assert report.ngram_lengths == (1, full, 3, 0)  # "and"; the copy; "an utterly forgettable"; nothing
    assert report.ngram_private_index[1] == 3
    assert report.summary["verbatim_copies"] == 1 and report.summary["ngram_max"] == full
    worst = report.top_by_ngram[0]
    assert worst.synthetic_index == 1 and worst.private_index == 3 and worst.ngram_length == full
    assert worst.matched_ngram == " ".join(word_tokens(PRIVATE[3]))
    assert report.nearest_index[1] == 3 and report.nearest_cosine[1] == pytest.approx(1.0, abs=1e-6)
    assert report.top_by_cosine[0].synthetic_index == 1 and report.top_by_cosine[0].cosine == pytest.approx(1.0, abs=1e-6)
    assert len(report.top_by_ngram) == 2 and report.top_by_ngram[1].synthetic_index == 2
    d = report.to_dict()
    assert d["summary"]["frac_ngram_ge_8"] == 0.25 and d["top_by_ngram"][0]["private_index"] == 3


def test_report_without_embeddings_and_argument_checks():
    synthetic = ["hide new secretions from", "the film", "hide new secretions from here"]
    report = memorization_report(synthetic, PRIVATE, show_progress=False)
    assert report.nearest_cosine is None and report.top_by_cosine == ()
    assert report.ngram_lengths == (4, 2, 4)
    # A fragment copied whole is a verbatim copy; a 2-word one is too short to count (min 4 words).
    assert report.summary["verbatim_copies"] == 1
    assert memorization_report(synthetic, PRIVATE, verbatim_min_words=2, show_progress=False).summary["verbatim_copies"] == 2
    with pytest.raises(ValueError, match="both"):
        memorization_report(["x"], PRIVATE, synthetic_embeddings=np.zeros((1, 3)))
    with pytest.raises(ValueError, match="one row per text"):
        memorization_report(["x"], PRIVATE, synthetic_embeddings=np.zeros((2, 3)), private_embeddings=np.zeros((5, 3)))


def test_nearest_neighbours_blocks_agree_with_full_matrix():
    rng = np.random.default_rng(2)
    q, k = rng.normal(size=(37, 8)), rng.normal(size=(23, 8))
    idx, cos = nearest_neighbours(q, k, block=5)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=1, keepdims=True)
    full = qn @ kn.T
    np.testing.assert_array_equal(idx, full.argmax(1))
    np.testing.assert_allclose(cos, full.max(1), rtol=1e-5)

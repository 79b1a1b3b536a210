"""Did the generator copy its private training data? Two checks per synthetic sample.

1. Longest common word n-gram with any private text (lowercased ``\\w+`` word tokens; punctuation is
   not a token). A synthetic sample whose longest match equals its own length is a verbatim copy (of
   part of a private text). Computed with a suffix automaton over the whole private corpus (Blumer et
   al. 1985; the standard longest-common-substring walk): building it is linear in the corpus length
   and each query is linear in the sample length, so 10k samples against 67k private texts stay fast.
   Every private text is followed by its own unique separator, so no match spans two texts.
2. Nearest private neighbour by cosine similarity of sentence embeddings (given by the caller, e.g.
   MiniLM): near-duplicates that are reworded or re-tokenised show up here rather than in (1).

The report keeps the worst cases (top-k by n-gram length, top-k by cosine) with both texts, for a
person to read. These are empirical checks, not a privacy guarantee: DP bounds what any attack can
learn, and these measure one kind of leak after the fact.
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lowercased word tokens: maximal runs of ``\\w`` characters (``"It's"`` -> ``["it", "s"]``)."""
    return _WORD.findall(text.lower())


class NgramIndex:
    """Longest common token n-gram of a query with any text of a corpus (suffix automaton).

    The automaton recognises every substring (contiguous token sequence) of the corpus; ``link`` is the
    suffix link, ``length`` the longest string of each state and ``first_end`` the corpus position
    where that string first ends, from which the matching text is recovered.
    """

    def __init__(self, texts: Sequence[str], *, show_progress: bool = False) -> None:
        self._vocab: dict[str, int] = {}
        self._starts: list[int] = []  # corpus offset of each text's first token
        self._next: list[dict[int, int]] = [{}]
        self._link: list[int] = [-1]
        self._len: list[int] = [0]
        self._first_end: list[int] = [-1]
        self._last = 0
        pos = 0
        for i, text in enumerate(tqdm(texts, desc="index private n-grams", unit="text", disable=not show_progress)):
            self._starts.append(pos)
            for word in word_tokens(text):
                self._extend(self._vocab.setdefault(word, len(self._vocab)), pos)
                pos += 1
            self._extend(-(i + 1), pos)  # separator, unique per text: no match crosses texts
            pos += 1
        self.num_texts = len(self._starts)

    def _extend(self, c: int, pos: int) -> None:
        nxt, link, length, first_end = self._next, self._link, self._len, self._first_end
        cur = len(length)
        nxt.append({})
        length.append(length[self._last] + 1)
        link.append(0)
        first_end.append(pos)
        p = self._last
        while p != -1 and c not in nxt[p]:
            nxt[p][c] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][c]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:
                clone = len(length)
                nxt.append(dict(nxt[q]))
                length.append(length[p] + 1)
                link.append(link[q])
                first_end.append(first_end[q])
                while p != -1 and nxt[p].get(c) == q:
                    nxt[p][c] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        self._last = cur

    def longest_match(self, tokens: Sequence[str]) -> tuple[int, int, int]:
        """``(n, text_index, query_end)``: the longest run of ``tokens`` found in one corpus text, which
        text (-1 when n = 0), and where the run ends in ``tokens`` (exclusive)."""
        nxt, link, length = self._next, self._link, self._len
        v, cur, best, best_state, best_end = 0, 0, 0, 0, 0
        for j, word in enumerate(tokens):
            c = self._vocab.get(word)
            if c is None:  # a word the corpus never uses ends every match
                v, cur = 0, 0
                continue
            while v and c not in nxt[v]:
                v = link[v]
                cur = length[v]
            if c in nxt[v]:
                v = nxt[v][c]
                cur += 1
            if cur > best:
                best, best_state, best_end = cur, v, j + 1
        if best == 0:
            return 0, -1, 0
        corpus_end = self._first_end[best_state]
        text_index = bisect.bisect_right(self._starts, corpus_end - best + 1) - 1
        return best, text_index, best_end


def nearest_neighbours(
    queries: np.ndarray, keys: np.ndarray, *, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, ``(index, cosine)`` of the most similar key row.

    Rows are L2-normalised here, so any embeddings work. Computed in blocks of ``block`` queries, so the
    (n_q, n_k) similarity matrix is never held whole.
    """
    q = np.asarray(queries, dtype=np.float32)
    k = np.asarray(keys, dtype=np.float32)
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"nearest_neighbours needs (n_q, d) and (n_k, d) arrays; got {q.shape} and {k.shape}.")
    if len(k) == 0:
        raise ValueError("nearest_neighbours: no key rows to search.")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
    idx = np.zeros(len(q), dtype=np.int64)
    cos = np.zeros(len(q), dtype=np.float32)
    for start in range(0, len(q), block):
        sims = q[start:start + block] @ k.T  # (block, n_k)
        idx[start:start + block] = sims.argmax(axis=1)
        cos[start:start + block] = sims.max(axis=1)
    return idx, cos


@dataclass(frozen=True)
class MemorizationCase:
    """One synthetic sample with its closest private text under one of the two checks."""

    synthetic_index: int
    synthetic_text: str
    private_index: int
    private_text: str
    ngram_length: int
    synthetic_length: int
    matched_ngram: str
    cosine: float | None


@dataclass(frozen=True)
class MemorizationReport:
    """Per-sample figures (tuples aligned with the synthetic texts), summary figures and worst cases.

    ``summary`` keys: ``n_synthetic``, ``n_private``, ``ngram_max``, ``ngram_mean``, ``ngram_median``,
    ``frac_ngram_ge_{k}`` for each threshold, ``verbatim_copies`` (samples of at least
    ``verbatim_min_words`` words found whole inside one private text, i.e. longest match = own length),
    and with embeddings ``cosine_max``, ``cosine_mean``, ``frac_cosine_ge_0.95``.
    """

    ngram_lengths: tuple[int, ...]
    ngram_private_index: tuple[int, ...]
    nearest_index: tuple[int, ...] | None
    nearest_cosine: tuple[float, ...] | None
    summary: dict[str, float | int]
    top_by_ngram: tuple[MemorizationCase, ...]
    top_by_cosine: tuple[MemorizationCase, ...]

    def to_dict(self) -> dict[str, object]:
        """Summary and worst cases, JSON-ready (per-sample tuples left out: they can be large)."""
        return {
            "summary": dict(self.summary),
            "top_by_ngram": [asdict(c) for c in self.top_by_ngram],
            "top_by_cosine": [asdict(c) for c in self.top_by_cosine],
        }


def memorization_report(
    synthetic_texts: Sequence[str],
    private_texts: Sequence[str],
    *,
    synthetic_embeddings: np.ndarray | None = None,
    private_embeddings: np.ndarray | None = None,
    top_k: int = 10,
    ngram_thresholds: Sequence[int] = (5, 8, 12),
    verbatim_min_words: int = 4,
    show_progress: bool = True,
) -> MemorizationReport:
    """Run both checks (the cosine one only when both embedding arrays are given).

    ``verbatim_min_words``: a sample counts as a verbatim copy only from this many words on; a one-word
    sample ("good") found in some private text is not evidence of memorisation.
    """
    if (synthetic_embeddings is None) != (private_embeddings is None):
        raise ValueError(
            "memorization_report: pass both synthetic_embeddings and private_embeddings, or neither."
        )
    if synthetic_embeddings is not None:
        if len(synthetic_embeddings) != len(synthetic_texts) or len(private_embeddings) != len(private_texts):
            raise ValueError(
                f"memorization_report: {len(synthetic_embeddings)} synthetic embeddings for {len(synthetic_texts)} "
                f"texts and {len(private_embeddings)} private embeddings for {len(private_texts)} texts; "
                "need one row per text."
            )
    index = NgramIndex(private_texts, show_progress=show_progress)
    lengths: list[int] = []
    sources: list[int] = []
    own_lengths: list[int] = []
    spans: list[str] = []
    for text in tqdm(synthetic_texts, desc="longest common n-gram", unit="text", disable=not show_progress):
        tokens = word_tokens(text)
        n, src, end = index.longest_match(tokens)
        lengths.append(n)
        sources.append(src)
        own_lengths.append(len(tokens))
        spans.append(" ".join(tokens[end - n:end]))

    nn_idx = nn_cos = None
    if synthetic_embeddings is not None and len(synthetic_texts) and len(private_texts):
        nn_idx, nn_cos = nearest_neighbours(synthetic_embeddings, private_embeddings)

    arr = np.asarray(lengths, dtype=np.float64)
    own = np.asarray(own_lengths)
    summary: dict[str, float | int] = {
        "n_synthetic": len(synthetic_texts),
        "n_private": len(private_texts),
        "ngram_max": int(arr.max()) if arr.size else 0,
        "ngram_mean": float(arr.mean()) if arr.size else 0.0,
        "ngram_median": float(np.median(arr)) if arr.size else 0.0,
        "verbatim_copies": int(np.sum((arr == own) & (own >= max(1, verbatim_min_words)))),
        "verbatim_min_words": int(verbatim_min_words),
    }
    for k in ngram_thresholds:
        summary[f"frac_ngram_ge_{k}"] = float(np.mean(arr >= k)) if arr.size else 0.0
    if nn_cos is not None:
        summary["cosine_max"] = float(nn_cos.max())
        summary["cosine_mean"] = float(nn_cos.mean())
        summary["frac_cosine_ge_0.95"] = float(np.mean(nn_cos >= 0.95))

    def case(i: int, private_index: int) -> MemorizationCase:
        return MemorizationCase(
            synthetic_index=i,
            synthetic_text=synthetic_texts[i],
            private_index=private_index,
            private_text=private_texts[private_index] if private_index >= 0 else "",
            ngram_length=lengths[i],
            synthetic_length=own_lengths[i],
            matched_ngram=spans[i] if private_index == sources[i] else "",
            cosine=float(nn_cos[i]) if nn_cos is not None else None,
        )

    by_ngram = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[:top_k]
    top_ngram = tuple(case(i, sources[i]) for i in by_ngram if lengths[i] > 0)
    top_cos: tuple[MemorizationCase, ...] = ()
    if nn_cos is not None:
        by_cos = np.argsort(-nn_cos, kind="stable")[:top_k]
        top_cos = tuple(case(int(i), int(nn_idx[i])) for i in by_cos)
    logger.info("Memorisation: %s", summary)
    return MemorizationReport(
        ngram_lengths=tuple(lengths),
        ngram_private_index=tuple(sources),
        nearest_index=tuple(int(i) for i in nn_idx) if nn_idx is not None else None,
        nearest_cosine=tuple(float(c) for c in nn_cos) if nn_cos is not None else None,
        summary=summary,
        top_by_ngram=top_ngram,
        top_by_cosine=top_cos,
    )

"""Audit canaries and their secret coin flips (Steinke, Nasr, Jagielski 2023, Algorithm 1, steps 1-2).

Two kinds:
- ``random_tokens``: ``length`` token ids drawn uniformly from the vocabulary (special tokens excluded).
  Nothing in ordinary data predicts them, so a drop in their loss is memorisation.
- ``secret_text``: a natural-looking sentence that ends in a random n-digit secret, e.g.
  "Dana Whitfield's account number is 4829173" (the Carlini et al. 2019 "secret sharer" canary). Only the
  secret's tokens are scored; the synthetic-text audit looks for the secret in generated text.

Each canary is included in the training set independently with probability 1/2. The coin flips are the
audit's secret: the guesses must be made without them, and they must never be published alongside a model.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

log = logging.getLogger(__name__)

CanaryKind = Literal["random_tokens", "secret_text"]

__all__ = ["Canaries", "CanaryKind", "make_canaries"]

_FIRST = ("Dana", "Omar", "Mei", "Lukas", "Priya", "Tomasz", "Ines", "Kwame", "Sofia", "Arjun", "Hana", "Mateo")
_LAST = ("Whitfield", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Castillo", "Novak", "Haddad", "Brennan", "Osei")
_TEMPLATES = (
    "{name}'s account number is {secret}",
    "The door code for {name}'s flat is {secret}",
    "{name} wrote down the PIN {secret}",
    "Reference for {name}'s claim: {secret}",
    "{name} can be reached on extension {secret}",
)


@dataclass(frozen=True)
class Canaries:
    """m canaries: token ids, which label positions are scored, and the secret inclusion coin flips.

    ``score_positions[i]`` are positions t >= 1 of ``token_ids[i]`` whose token is scored (predicted from
    the tokens before it); training uses every position t >= 1.
    """

    kind: CanaryKind
    token_ids: tuple[tuple[int, ...], ...]
    score_positions: tuple[tuple[int, ...], ...]
    included: np.ndarray  # (m,) bool, the coin flips: True = in the training set
    texts: tuple[str, ...] | None = None
    secrets: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    def in_training(self) -> list[tuple[int, ...]]:
        """Token ids of the canaries whose coin came up "in"."""
        return [ids for ids, inc in zip(self.token_ids, self.included) if inc]


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def make_canaries(
    num_canaries: int,
    *,
    kind: CanaryKind = "random_tokens",
    vocab_size: int | None = None,
    tokenizer: Any = None,
    length: int = 16,
    secret_digits: int = 6,
    seed: int | None = None,
    exclude_ids: Sequence[int] = (),
) -> Canaries:
    """Draw ``num_canaries`` canaries and their coin flips (P[in] = 1/2 each, independent).

    Args:
        kind: "random_tokens" (needs ``vocab_size`` or ``tokenizer``) or "secret_text" (needs ``tokenizer``).
        length: tokens per random-token canary (including the first, unscored one).
        secret_digits: n, the digits of a secret_text canary's secret (uniform over 10^n values).
        seed: seeds both canaries and coin flips; None draws one from the OS. Keep it secret.
        exclude_ids: token ids never drawn (the pad id of a tokenizer-less model, say).
    """
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
        raise ValueError(f"num_canaries must be an int >= 2 (half are expected in, half out), got {num_canaries!r}")
    if kind not in ("random_tokens", "secret_text"):
        raise ValueError(f"kind must be 'random_tokens' or 'secret_text', got {kind!r}")
    rng = np.random.default_rng(seed)
    included = rng.random(num_canaries) < 0.5
    if kind == "random_tokens":
        if length < 2:
            raise ValueError(f"length must be >= 2 (the first token is context, the rest are scored), got {length}")
        V = vocab_size if vocab_size is not None else (len(tokenizer) if tokenizer is not None else None)
        if V is None:
            raise ValueError("random_tokens canaries need vocab_size= or tokenizer= (to know which ids exist)")
        banned = set(exclude_ids) | (_special_ids(tokenizer) if tokenizer is not None else set())
        allowed = np.array([t for t in range(V) if t not in banned])
        if len(allowed) < 2:
            raise ValueError(f"no token ids left to draw from (vocab {V}, {len(banned)} excluded)")
        ids = tuple(tuple(int(t) for t in rng.choice(allowed, size=length)) for _ in range(num_canaries))
        positions = tuple(tuple(range(1, length)) for _ in range(num_canaries))
        texts = tuple(tokenizer.decode(list(c)) for c in ids) if tokenizer is not None else None
        return Canaries(kind, ids, positions, included, texts, None)

    if tokenizer is None:
        raise ValueError("secret_text canaries need tokenizer= (the model's tokenizer) to turn texts into token ids")
    if secret_digits < 1:
        raise ValueError(f"secret_digits must be >= 1, got {secret_digits}")
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    ids_all, pos_all, texts, secrets, seen = [], [], [], [], set()
    while len(secrets) < num_canaries:
        secret = "".join(str(d) for d in rng.integers(0, 10, size=secret_digits))
        if secret in seen:
            continue
        seen.add(secret)
        name = f"{_FIRST[rng.integers(len(_FIRST))]} {_LAST[rng.integers(len(_LAST))]}"
        prefix = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(name=name, secret="").rstrip()
        text = f"{prefix} {secret}"
        head = bos + tokenizer.encode(prefix, add_special_tokens=False)
        ids = bos + tokenizer.encode(text, add_special_tokens=False)
        if ids[: len(head)] == head and len(ids) > len(head):
            positions = tuple(range(len(head), len(ids)))  # the secret's tokens
        else:  # the tokenizer merged across the boundary: score everything after the first token
            log.warning("secret_text canary %r: prefix tokens are not a prefix of the text's; scoring all tokens", text)
            positions = tuple(range(1, len(ids)))
        ids_all.append(tuple(ids))
        pos_all.append(positions)
        texts.append(text)
        secrets.append(secret)
    return Canaries(kind, tuple(ids_all), tuple(pos_all), included, tuple(texts), tuple(secrets))

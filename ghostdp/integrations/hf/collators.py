"""Prefix-LM batches for causal LMs, and the per-example loss that DP-SGD needs.

A training example is ``prefix(label) + text + EOS`` (see ``prompts.py``). The model is scored on the
text tokens and on the EOS that ends them (so it learns where to stop), never on the prefix (it is given
at generation time) nor on padding. A text too long for ``max_length`` is cut and gets NO EOS: its last
kept tokens are still scored, but the model is never taught "stop here" at a point where the real text
went on (an EOS after every cut row teaches every long text to end after ``max_length`` tokens).

Layout of a batch (right padding, ``P`` = prefix ids, ``X`` = text ids, ``E`` = EOS, ``_`` = pad)::

    input_ids       P P P X X X E _ _
    attention_mask  1 1 1 1 1 1 1 0 0
    labels          - - - X X X E - -      (- is -100)

``labels`` is aligned with ``input_ids`` (Hugging Face convention); the shift by one happens in the loss,
where position t's logits predict the label at t + 1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ghostdp.engine.loss import per_example_lm_loss  # noqa: F401  (re-exported: the loss these batches need)
from ghostdp.integrations.hf.prompts import PromptTemplate

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class CollatorConfig:
    """How :class:`PrefixLMCollator` builds a batch.

    Args:
        template: the label prefix.
        max_length: the most tokens a row may have, prefix and EOS included. Longer texts are cut at the
            end of the text: the prefix (the condition) is always kept; the EOS (the stop signal) only ends a
            text that fit whole, so a cut row ends with its last kept text token (scored) and no EOS.
        pad_to: ``"longest"`` pads to the longest row of the batch; ``"max_length"`` always pads to
            ``max_length`` (fixed shapes, e.g. for compiled kernels).
        add_bos: put the tokenizer's BOS token before the prefix (unscored). SmolLM2 and GPT-2 use no BOS
            by default; Llama-style models expect one. Not with a chat template (``template.chat``), which
            writes its own.
    """

    template: PromptTemplate = field(default_factory=PromptTemplate)
    max_length: int = 128
    pad_to: Literal["longest", "max_length"] = "longest"
    add_bos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(
                f"CollatorConfig.max_length={self.max_length!r}: need an int >= 2 (room for a prefix and the EOS)."
            )
        if self.pad_to not in ("longest", "max_length"):
            raise ValueError(f"CollatorConfig.pad_to={self.pad_to!r}: pick 'longest' or 'max_length'.")
        if self.add_bos and self.template.chat:
            raise ValueError("CollatorConfig: add_bos=True with a chat template; the chat template writes its own "
                             "BOS where the model expects one. Set add_bos=False.")


@dataclass(frozen=True)
class EncodedExample:
    """One tokenized row before padding: ``input_ids[:n_prefix]`` are the unscored prefix.

    ``truncated``: the text and its EOS did not fit in ``max_length``, so the row ends without EOS.
    """

    input_ids: tuple[int, ...]
    n_prefix: int
    truncated: bool


class PrefixLMCollator:
    """Turn ``[{"text": ..., "label": ...}, ...]`` into ``input_ids``, ``attention_mask``, ``labels``.

    Why the prefix and the text are tokenized separately and their ids concatenated: subword tokenizers
    merge across the boundary when given one string. With SmolLM2, ``"[sst2][positive]: a great movie"``
    ends the prefix with ``":"`` and starts the text with the token ``" a"``, which holds the prefix's
    trailing space. Tokenized as one string, no token boundary falls exactly where the prefix ends, so
    no mask can separate "given" from "scored". Tokenized apart, the boundary is exact, and the prefix
    ids are the same for every row of a label, so generation can start from exactly the ids training
    conditioned on (:meth:`prefix_ids`).

    Padding: a tokenizer without a pad token pads with EOS. The EOS that ends the text is still scored
    and the padding is not, because the mask is built from positions (each row's true length), never
    by comparing token ids with the pad id.
    """

    def __init__(self, tokenizer: Any, config: CollatorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config if config is not None else CollatorConfig()
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no eos_token_id: the collator ends every text with EOS so "
                "the model learns to stop. Set tokenizer.eos_token (e.g. to the model's end-of-turn token)."
            )
        self.eos_token_id: int = int(eos)
        end_of_turn = self.config.template.end_of_turn_id(tokenizer)
        if end_of_turn is not None:  # a chat template: a reply ends with its end-of-turn token
            self.eos_token_id = end_of_turn
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_id
        self.bos_token_id: int | None = None
        if self.config.add_bos:
            bos = getattr(tokenizer, "bos_token_id", None)
            if bos is None:
                raise ValueError(
                    f"CollatorConfig.add_bos=True but {type(tokenizer).__name__} has no bos_token_id; "
                    "set add_bos=False or give the tokenizer a BOS token."
                )
            self.bos_token_id = int(bos)
        self._prefix_cache: dict[str, tuple[int, ...]] = {}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def prefix_ids(self, label: str) -> tuple[int, ...]:
        """The ids every row of ``label`` starts with (BOS included when ``add_bos``); use them to generate."""
        if label not in self._prefix_cache:
            ids = tuple(self._ids([self.config.template.prefix_text(label, self.tokenizer)])[0])
            if self.bos_token_id is not None:
                ids = (self.bos_token_id, *ids)
            self._prefix_cache[label] = ids
        return self._prefix_cache[label]

    def encode(self, examples: Sequence[Mapping[str, str]]) -> list[EncodedExample]:
        """Tokenize rows into prefix + text + EOS, or prefix + cut text (no EOS), without padding."""
        labels: list[str] = []
        texts: list[str] = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or "text" not in ex or "label" not in ex:
                raise ValueError(
                    f"PrefixLMCollator: example {i} is {type(ex).__name__} {ex!r:.80}; expected a mapping "
                    "with 'text' and 'label' keys (LabelledTexts.examples() gives these)."
                )
            labels.append(str(ex["label"]))
            texts.append(str(ex["text"]))
        out: list[EncodedExample] = []
        max_len = self.config.max_length
        for label, text_ids in zip(labels, self._ids(texts)):
            prefix = self.prefix_ids(label)
            budget = max_len - len(prefix) - 1  # room left for text tokens after prefix and EOS
            if budget < 0:
                raise ValueError(
                    f"CollatorConfig.max_length={max_len} cannot hold the {len(prefix)}-token prefix for label "
                    f"{label!r} plus EOS; raise max_length to at least {len(prefix) + 1} (plus room for text)."
                )
            truncated = len(text_ids) > budget
            if truncated:  # the text goes on: fill the EOS's slot with one more text token, and no EOS
                ids = (*prefix, *text_ids[:budget + 1])
            else:
                ids = (*prefix, *text_ids, self.eos_token_id)
            out.append(EncodedExample(input_ids=ids, n_prefix=len(prefix), truncated=truncated))
        return out

    def __call__(self, examples: Sequence[Mapping[str, str]]) -> dict[str, torch.Tensor]:
        """Pad to a batch. An empty list (Poisson sampling can draw none) gives (0, T) tensors."""
        encoded = self.encode(examples)
        n_trunc = sum(e.truncated for e in encoded)
        if n_trunc:
            logger.debug("PrefixLMCollator: truncated %d of %d texts to max_length=%d", n_trunc, len(encoded),
                         self.config.max_length)
        if self.config.pad_to == "max_length":
            width = self.config.max_length
        else:
            width = max((len(e.input_ids) for e in encoded), default=0)
        b = len(encoded)
        input_ids = torch.full((b, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((b, width), dtype=torch.long)  # (B, T)
        labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            row = torch.tensor(e.input_ids, dtype=torch.long)
            input_ids[i, :n] = row
            attention_mask[i, :n] = 1
            # Positions [n_prefix, n) are the text and its EOS: scored. Chosen by position, so an EOS used
            # as padding beyond n stays unscored while the EOS at n - 1 is scored.
            labels[i, e.n_prefix:n] = row[e.n_prefix:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

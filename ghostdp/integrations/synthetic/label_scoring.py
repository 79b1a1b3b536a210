"""The DP generator's own label likelihood ratio: a filter for its samples and a zero-shot classifier.

For a text x and a label y, with ``prefix(y)`` the exact ids training conditioned on
(``PrefixLMCollator.prefix_ids``)::

    ll(x, y)     = log p(x | prefix(y))                 (sum over the text tokens, and the EOS if x fit whole)
    margin(x, y) = ll(x, y) - max over y' != y of ll(x, y')

Both uses read only the DP fine-tuned generator and inputs that are not private training data:

* **Filtering** (the recipe Google used for DP-trained safety classifiers' data): keep a synthetic sample
  generated for label y only if ``margin(x, y) > threshold``, i.e. the generator itself would rather
  have written x under y than under any other label. The samples and the model are both outputs of the
  DP mechanism, so the filter is post-processing: it costs no privacy. The synthesis loop over-generates
  until every label has its requested count, and records per label how many candidates were scored and
  how many were kept (the acceptance rate). With a top fraction f < 1, only the ceil(f n) largest margins
  of each batch of n candidates are kept (over-generate about 1/f times and select).
* **The generator as classifier**: predict ``argmax_y ll(x, y)`` for a held-out text. A free baseline
  (no classifier is trained on anything) that shows how much label signal DP fine-tuning put into the
  generator, independently of how well sampling brings it out.

All labels score the same text tokens (each text is cut to one token budget before the prefixes are
put in front), so the log-likelihoods of different labels are comparable sums. A text cut to the budget
gets no EOS, as in training (``collators.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "TOKENS_PER_BATCH",
    "LabelScorer",
    "MarginFilter",
    "generation_budget",
    "generator_classifier_metrics",
    "margin_filter_for",
    "margins",
]

logger = logging.getLogger(__name__)

#: Text tokens per scoring forward when ``LabelScorer.batch_size`` is none.
TOKENS_PER_BATCH = 4096


def generation_budget(collator: Any, label_names: Sequence[str]) -> int:
    """New tokens that cover every training row: ``max_length`` minus the shortest label prefix.

    A training row is ``prefix + text + EOS`` when the text fit (text + EOS <= max_length - prefix) and
    ``prefix + text`` when it was cut (text = max_length - prefix tokens), so a generation budget of
    ``max_length - len(prefix)`` new tokens can reproduce either.
    """
    shortest = min(len(collator.prefix_ids(label)) for label in label_names)
    return int(collator.config.max_length) - shortest


def margins(log_likelihoods: np.ndarray, label_index: Sequence[int]) -> np.ndarray:
    """``ll[i, y_i] - max over k != y_i of ll[i, k]`` for each row i; shape (n,). Needs >= 2 labels."""
    ll = np.asarray(log_likelihoods, dtype=np.float64)  # (n, K)
    if ll.ndim != 2 or ll.shape[1] < 2:
        raise ValueError(f"margins: need an (n, K >= 2) array of log-likelihoods, got shape {ll.shape}.")
    y = np.asarray(label_index, dtype=np.int64)  # (n,)
    if y.shape != (ll.shape[0],):
        raise ValueError(f"margins: {ll.shape[0]} rows but {y.shape} label indices.")
    own = ll[np.arange(len(y)), y]
    others = ll.copy()
    others[np.arange(len(y)), y] = -np.inf
    return own - others.max(axis=1)


@dataclass
class LabelScorer:
    """``log p(text | prefix(label))`` for every label, from a generator and the collator it was trained with.

    Args:
        model: the (DP fine-tuned) causal LM; put in eval mode by the caller.
        collator: its ``PrefixLMCollator`` (prefix ids, EOS id, tokenizer, ``max_length``).
        label_names: the labels, in output-column order.
        max_text_tokens: the token budget every text is cut to (none: :func:`generation_budget`, the new
            tokens a sample may have, so every sample the generator can produce is scored whole under every
            label and long texts cost what training rows cost). A text shorter than the budget is scored with
            the EOS that ends it; a longer one is cut to the budget and gets no EOS, as the collator and the
            sampler treat it (a text of exactly the budget was cut there, not ended).
        batch_size: rows per forward pass (none: ``TOKENS_PER_BATCH // text budget``, 1 to 64 rows: 64 rows of
            13 tokens score 30% faster than 16 on a 2-core CPU, and a long budget keeps the (rows x tokens x
            vocabulary) logits of one forward as small as 16 rows of 256 tokens).
        device: where the model is (default: its parameters' device).
    """

    model: torch.nn.Module
    collator: Any
    label_names: tuple[str, ...]
    max_text_tokens: int | None = None
    batch_size: int | None = None
    device: torch.device | None = None
    show_progress: bool = False
    _budget: int = field(init=False, repr=False, default=0)

    def __post_init__(self) -> None:
        self.label_names = tuple(self.label_names)
        if len(self.label_names) < 2:
            raise ValueError(f"LabelScorer: need at least two labels to compare, got {self.label_names}.")
        budget = (self.max_text_tokens if self.max_text_tokens is not None
                  else generation_budget(self.collator, self.label_names))
        if budget < 1:
            raise ValueError(f"LabelScorer: a text budget of {budget} tokens scores nothing; raise max_text_tokens "
                             "(or the collator's max_length).")
        self._budget = int(budget)
        if self.batch_size is None:
            self.batch_size = max(1, min(64, TOKENS_PER_BATCH // self._budget))
        elif self.batch_size < 1:
            raise ValueError(f"LabelScorer: batch_size={self.batch_size}; need >= 1 rows per forward.")
        if self.device is None:
            self.device = next(self.model.parameters()).device

    @property
    def text_budget(self) -> int:
        """The number of text tokens every text is cut to before scoring."""
        return self._budget

    def _text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids plus EOS when text and EOS fit in the budget, else its first ``budget`` ids."""
        if not texts:
            return []
        eos = self.collator.eos_token_id
        ids = self.collator.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[*t, eos] if len(t) < self._budget else list(t[: self._budget]) for t in ids]

    @torch.inference_mode()
    def log_likelihoods(self, texts: Sequence[str]) -> np.ndarray:
        """Shape (len(texts), K): summed log-probabilities of each text's scored tokens under each label.

        Every row of a batch has the same label prefix, so a model with a key/value cache runs the prefix
        once (batch 1; a prompt-tuned model's base runs ``[virtual tokens, prefix]``) and only the text tokens
        per row; a model without a cache gets the whole ``prefix + text`` per row. Both equal the training
        forward's loss to float rounding (tests/synthetic/test_label_scoring.py).
        """
        texts = list(texts)
        out = np.zeros((len(texts), len(self.label_names)), dtype=np.float64)
        if not texts:
            return out
        text_ids = self._text_ids(texts)
        order = sorted(range(len(texts)), key=lambda i: len(text_ids[i]))  # similar lengths share a batch
        from ghostdp.integrations.synthetic.synthesize import caches_prefix

        shared = caches_prefix(self.model)
        steps = [(k, s) for k in range(len(self.label_names)) for s in range(0, len(order), self.batch_size)]
        for k, s in tqdm(steps, desc="label scoring", unit="batch", disable=not self.show_progress):
            prefix = list(self.collator.prefix_ids(self.label_names[k]))
            rows = order[s:s + self.batch_size]
            score = self._score_after_prefix if shared else self._score_whole
            out[rows, k] = score(prefix, [text_ids[i] for i in rows]).double().cpu().numpy()
        return out

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask, both (b, T)."""
        width = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), width), self.collator.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, q in enumerate(seqs):
            ids[j, :len(q)] = torch.tensor(q)
            mask[j, :len(q)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _score_whole(self, prefix: list[int], texts: list[list[int]]) -> torch.Tensor:
        """(b,) summed log-probabilities of the texts' tokens, running ``prefix + text`` for every row."""
        from ghostdp.integrations.hf.models import input_position_logits

        ids, mask = self._padded([prefix + t for t in texts])  # (b, T)
        scored = mask.bool().clone()
        scored[:, :len(prefix)] = False  # only the text tokens (and their EOS) are scored
        logits = input_position_logits(self.model, self.model(input_ids=ids, attention_mask=mask).logits, ids.shape[1])
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, T-1)
        return (logp * scored[:, 1:]).sum(dim=1)  # position t predicts token t + 1

    def _score_after_prefix(self, prefix: list[int], texts: list[list[int]]) -> torch.Tensor:
        """As :meth:`_score_whole`, with the prefix run once and its cache repeated over the rows."""
        from ghostdp.integrations.synthetic.synthesize import (
            CACHE_KEYWORD,
            is_prompt_learning,
            repeated_prefix_cache,
        )

        head = torch.tensor([prefix], dtype=torch.long, device=self.device)  # (1, P)
        model, start = self.model, {"input_ids": head}
        if is_prompt_learning(self.model):  # the base model after [virtual tokens, prefix], as PEFT's forward runs
            model = self.model.get_base_model()
            embeds = model.get_input_embeddings()(head)
            virtual = self.model.get_prompt(batch_size=1).to(device=embeds.device, dtype=embeds.dtype)
            start = {"inputs_embeds": torch.cat([virtual, embeds], dim=1)}  # (1, V + P, d)
        ids, mask = self._padded(texts)  # (b, T)
        cache, head_logits = repeated_prefix_cache(model, ids.shape[0], **start)
        first = head_logits[:, -1].float()  # (1, V): predicts text token 0
        width = head_logits.shape[1]
        full_mask = torch.cat([torch.ones((ids.shape[0], width), dtype=mask.dtype, device=mask.device), mask], 1)
        logits = model(input_ids=ids, attention_mask=full_mask, use_cache=True,
                       **{CACHE_KEYWORD: cache}).logits[:, :-1].float()  # (b, T-1, V)
        logits = torch.cat([first.expand(ids.shape[0], 1, -1), logits], dim=1)  # (b, T, V): position t -> token t
        logp = F.log_softmax(logits, dim=-1).gather(-1, ids[:, :, None]).squeeze(-1)  # (b, T)
        return (logp * mask).sum(dim=1)

    def predict(self, texts: Sequence[str]) -> list[str]:
        """``argmax_y log p(text | prefix(y))`` per text (ties go to the first label)."""
        ll = self.log_likelihoods(texts)
        return [self.label_names[i] for i in ll.argmax(axis=1).tolist()]

    def margins(self, texts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
        """``margin(text, label)`` per row; shape (n,)."""
        unknown = sorted(set(labels) - set(self.label_names))
        if unknown:
            raise ValueError(f"LabelScorer.margins: labels {unknown} are not among {self.label_names}.")
        index = [self.label_names.index(label) for label in labels]
        return margins(self.log_likelihoods(texts), index)


@dataclass
class MarginFilter:
    """Keep a sample generated for ``label`` only if its margin exceeds ``threshold`` (post-processing).

    With ``top_fraction`` f < 1, also keep at most ``ceil(f * n)`` of a batch's n candidates: those with the
    largest margins (ties go to the earlier candidate). The synthesis loop then generates about 1/f times as
    many candidates and keeps the ones the generator finds most typical of their label: "over-generate and
    select", still post-processing of the DP model alone.

    Called by :func:`ghostdp.integrations.synthetic.synthesize.synthesize` once per batch with the batch's
    candidate texts; returns ``[(keep, margin)]`` in the same order.

    Raises:
        ValueError: ``top_fraction`` outside (0, 1].
    """

    scorer: LabelScorer
    threshold: float = 0.0
    top_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not (0.0 < self.top_fraction <= 1.0):
            raise ValueError(f"MarginFilter.top_fraction={self.top_fraction!r}: need a fraction in (0, 1] of each "
                             "batch's candidates to keep (1: every candidate above the threshold).")

    def __call__(self, label: str, texts: Sequence[str]) -> list[tuple[bool, float]]:
        if not texts:
            return []
        m = self.scorer.margins(texts, [label] * len(texts))
        keep = m > self.threshold
        if self.top_fraction < 1.0:
            k = math.ceil(self.top_fraction * len(texts))
            order = np.argsort(-m, kind="stable")  # largest margin first, earlier candidate first on ties
            top = np.zeros(len(texts), dtype=bool)
            top[order[:k]] = True
            keep &= top
        return [(bool(kp), float(v)) for kp, v in zip(keep, m, strict=True)]

    def describe(self) -> dict[str, Any]:
        """What goes into the synthesis metadata (and its resume fingerprint)."""
        rule = "keep if log p(x | prefix(y)) - max_{y' != y} log p(x | prefix(y')) > threshold"
        info: dict[str, Any] = {
            "kind": "label likelihood-ratio margin of the DP generator",
            "rule": rule,
            "threshold": float(self.threshold),
            "max_text_tokens": self.scorer.text_budget,
            "privacy": "post-processing of the DP generator and its own samples: costs no privacy, reads no "
                       "private data",
        }
        if self.top_fraction < 1.0:  # absent at 1, so sets filtered before the option existed still resume
            info["top_fraction"] = float(self.top_fraction)
            info["rule"] = rule + ", and the margin is among the top_fraction largest of its batch"
        return info


def margin_filter_for(generator: Any, threshold: float | None, *, top_fraction: float = 1.0,
                      model: torch.nn.Module | None = None, show_progress: bool = False) -> MarginFilter | None:
    """The filter for a loaded generator (``synthesize.LoadedGenerator``), or None when ``threshold`` is None.

    ``top_fraction``: see :class:`MarginFilter`. ``model``: score with this model instead of
    ``generator.model`` (the base model, for the floor).
    """
    if threshold is None:
        return None
    scorer = LabelScorer(model if model is not None else generator.model, generator.collator, generator.label_names,
                         device=generator.device, show_progress=show_progress)
    return MarginFilter(scorer, float(threshold), float(top_fraction))


def generator_classifier_metrics(
    generator: Any, texts: Sequence[str], labels: Sequence[str], *, max_text_tokens: int | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Accuracy (and per-class recall) of the DP generator as a zero-shot classifier of ``texts``.

    Reads the DP model and the held-out evaluation texts only; nothing is trained.
    """
    from ghostdp.integrations.synthetic.classifiers import classification_metrics

    scorer = LabelScorer(generator.model, generator.collator, generator.label_names, device=generator.device,
                         max_text_tokens=max_text_tokens, show_progress=show_progress)
    pred = scorer.predict(texts)
    metrics = classification_metrics(labels, pred, generator.label_names)
    metrics["n_train"] = 0
    metrics["note"] = ("argmax over labels of log p(text | prefix(label)) under the DP generator; zero-shot, "
                       "post-processing of the DP model")
    logger.info("accuracy[generator_classifier] = %.4f", metrics["accuracy"])
    return metrics


def acceptance_rates(filter_counts: Mapping[str, Mapping[str, int]]) -> dict[str, float | None]:
    """``accepted / scored`` per label (None where nothing was scored)."""
    out: dict[str, float | None] = {}
    for label, c in filter_counts.items():
        scored = int(c.get("scored", 0))
        out[label] = int(c.get("accepted", 0)) / scored if scored else None
    return out


def filter_section(filter_meta: Mapping[str, Any] | None) -> str:
    """The report's Markdown section on the label filter ("" when no filter was used)."""
    if not filter_meta:
        return ""
    rates = filter_meta.get("acceptance_rate", {})
    counts = filter_meta.get("counts", {})
    lines = ["## Label filter (post-processing of the DP generator: costs no privacy)", "",
             (f"Kept a sample only if {filter_meta['rule']}, threshold {filter_meta['threshold']:g}"
              + (f", top fraction {filter_meta['top_fraction']:g}" if "top_fraction" in filter_meta else "")
              + ". The filter "
              "reads the DP model and its own samples only; more samples were generated until every label had its "
              "count."),
             "", "| label | scored | accepted | acceptance rate |", "| --- | --- | --- | --- |"]
    for label, c in counts.items():
        rate = rates.get(label)
        lines.append(f"| {label} | {c.get('scored', 0)} | {c.get('accepted', 0)} | "
                     f"{'n/a' if rate is None else f'{rate:.3f}'} |")
    return "\n".join(lines) + "\n\n"

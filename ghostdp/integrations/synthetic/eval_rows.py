"""Extra evaluation rows that isolate what DP synthesis loses (issue 11), called by ``evaluate.evaluate_run``.

``real_matched``           real private rows, as many per label as the synthetic set has, each cut to the
                           synthetic set's length cap (its ``max_new_tokens`` generator tokens): the honest
                           ceiling for *this* synthetic set. A non-private reference (reads the private data).
``generator_classifier``   the DP generator itself as a zero-shot classifier of the held-out texts
                           (``label_scoring``): no classifier trained, post-processing of the DP model.
``public_only``            the downstream classifier on a PUBLIC labelled set the user names
                           (``evaluate.public_data``), and
``synthetic_plus_public``  on the synthetic set mixed with it: does the DP synthetic data add anything to
                           what is public anyway?
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from ghostdp.integrations.synthetic.config import ConfigError, RunConfig
from ghostdp.integrations.synthetic.text_data import LabelledTexts

__all__ = ["cut_to_tokens", "extra_train_sets", "generator_row", "matched_real", "public_sets"]

logger = logging.getLogger(__name__)


def cut_to_tokens(texts: tuple[str, ...] | list[str], tokenizer: Any, max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens (decoded back to text); shorter texts unchanged."""
    if max_tokens < 1:
        raise ValueError(f"cut_to_tokens: max_tokens={max_tokens}; need >= 1.")
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [t if len(i) <= max_tokens else tokenizer.decode(i[:max_tokens], skip_special_tokens=True).strip()
            for t, i in zip(texts, ids)]


def matched_real(private: LabelledTexts, counts: Mapping[str, int], *, tokenizer: Any, max_tokens: int,
                 seed: int) -> LabelledTexts:
    """A seeded subset of ``private`` with ``counts[label]`` rows per label (all of a label when it has fewer),
    each text cut to ``max_tokens`` tokens."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(private.labels, dtype=object)
    chosen: list[int] = []
    for label, n in counts.items():
        rows = np.flatnonzero(labels == label)
        if len(rows) < n:
            logger.warning("real_matched: label %r has %d private rows, fewer than the %d synthetic ones; using all",
                           label, len(rows), n)
        chosen += rng.permutation(rows)[: int(n)].tolist()
    chosen.sort()
    sub = private.subset(chosen)
    texts = cut_to_tokens(sub.texts, tokenizer, max_tokens)
    keep = [i for i, t in enumerate(texts) if t]  # a text whose first tokens decode to nothing
    return LabelledTexts([texts[i] for i in keep], [sub.labels[i] for i in keep], private.label_names,
                         source=f"{private.source} (matched: {len(keep)} rows cut to {max_tokens} tokens)")


def public_sets(config: RunConfig, synthetic: LabelledTexts) -> dict[str, LabelledTexts]:
    """``{"public_only", "synthetic_plus_public"}`` from ``evaluate.public_data`` (empty when it is none)."""
    spec = config.evaluate.public_data
    if spec is None:
        return {}
    if spec == config.data.train_data:
        raise ConfigError(f"evaluate.public_data={spec!r} is the PRIVATE training data: name a public labelled set.")
    from ghostdp.integrations.synthetic.text_data import (
        TextDataConfig,
        load_labelled_texts,
        load_sst2,
    )

    dcfg = config.data
    if spec.startswith("sst2:"):
        public = load_sst2(spec.split(":", 1)[1], data_dir=dcfg.sst2_dir)
    else:
        public = load_labelled_texts(TextDataConfig(
            source=spec, text_column=dcfg.text_column, label_column=dcfg.label_column,
            label_names=dict(dcfg.label_names) if dcfg.label_names is not None else None))
    names = synthetic.label_names
    extra = sorted(set(public.labels) - set(names))
    if extra:
        raise ConfigError(f"evaluate.public_data {public.source} has labels {extra} the generator does not know "
                          f"({list(names)}).")
    public = LabelledTexts(public.texts, public.labels, names, source=public.source)
    mixed = LabelledTexts(synthetic.texts + public.texts, synthetic.labels + public.labels, names,
                          source=f"{synthetic.source} + {public.source}")
    return {"public_only": public, "synthetic_plus_public": mixed}


def extra_train_sets(config: RunConfig, gen: Any, private: LabelledTexts, synthetic: LabelledTexts,
                     syn_meta: Mapping[str, Any]) -> dict[str, LabelledTexts]:
    """The training sets of the extra downstream rows: ``real_matched`` and the public ones."""
    counts = {label: synthetic.labels.count(label) for label in synthetic.label_names}
    cap = int(syn_meta["sampling"]["max_new_tokens"])
    out = {"real_matched": matched_real(private, counts, tokenizer=gen.tokenizer, max_tokens=cap,
                                        seed=config.evaluate.eval_seed)}
    out.update(public_sets(config, synthetic))
    return out


def generator_row(config: RunConfig, gen: Any, heldout: LabelledTexts, *, show_progress: bool = False
                  ) -> dict[str, Any] | None:
    """The "DP generator as classifier" row on (a seeded subset of) the held-out data; None when skipped."""
    from ghostdp.integrations.synthetic.label_scoring import (
        generator_classifier_metrics,
    )

    n = config.evaluate.generator_classifier_rows
    if n == 0:
        return None
    rows = heldout
    if n is not None and n < len(heldout):
        idx = np.sort(np.random.default_rng(config.evaluate.eval_seed + 11).choice(len(heldout), n, replace=False))
        rows = heldout.subset(idx.tolist())
    return generator_classifier_metrics(gen, rows.texts, rows.labels, show_progress=show_progress)

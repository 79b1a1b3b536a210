"""How good, and how private-looking, is the DP synthetic text? All scored on REAL held-out data.

Downstream utility (Yue et al., ACL 2023): the same classifier is trained on four sets and scored on the
real held-out set the generator never saw:

``synthetic``      the DP synthetic samples: the number that matters.
``real_ceiling``   the real private training data, without privacy: a reference, not a release.
``dp_on_real``     a classifier trained with DP-SGD directly on the real private data, at the synthetic
                   data's epsilon: the bar DP synthetic data has to match to be worth it (it also buys a
                   reusable dataset rather than one model). Default: a linear head on frozen MiniLM
                   sentence embeddings trained with ghostdp's ``PrivacyEngine`` and
                   ``PoissonBatchSampler``; option ``dp_classifier="minilm"``: DP-SGD on every MiniLM
                   parameter (both in :mod:`ghostdp.integrations.synthetic.dp_classifiers`). n/a for a
                   generator trained with epsilon inf (NOT private: no budget to match) unless
                   ``evaluate.dp_epsilon`` names one.
``prior_floor``    samples from the *un-finetuned* model with the same prompts: what the base model knows
                   without the private data. Synthetic data that does not beat it learnt nothing usable.

Also: MAUVE (synthetic vs real held-out, MiniLM features; with the floor and a real-vs-real reference
beside it), held-out perplexity of the generator (per token, the label prefix not scored, next to the
base model's), text lengths, label fidelity (does a real-data classifier agree with the label each
sample was generated for), and the memorisation check (longest common n-gram and nearest private
neighbour, with worst cases).

The baselines and the memorisation check read the private data: the report is an evaluation for the
data owner, not a release (it quotes private texts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ghostdp.engine import planning
from ghostdp.integrations.synthetic.classifiers import (
    FineTuneConfig,
    LinearProbe,
    LinearProbeConfig,
    MiniLMClassifier,
    classification_metrics,
    label_fidelity,
)
from ghostdp.integrations.synthetic.config import ConfigError, RunConfig
from ghostdp.integrations.synthetic.dp_classifiers import (
    DPClassifierConfig,
    DPLinearProbe,
    DPMiniLMClassifier,
)
from ghostdp.integrations.synthetic.text_data import LabelledTexts

__all__ = [
    "EvaluationResult",
    "evaluate_run",
    "evaluate_synthetic",
    "heldout_perplexity",
    "synthetic_texts_from_rows",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------------


@torch.inference_mode()
def heldout_perplexity(
    model: nn.Module, collator: Any, data: LabelledTexts, *, batch_size: int = 16, device: torch.device | None = None,
    show_progress: bool = True, desc: str = "perplexity",
) -> dict[str, float | int]:
    """Per-token perplexity of ``label prefix + text + EOS`` rows, scoring the text and EOS tokens only.

    ``exp(sum of token NLLs / number of scored tokens)`` over all rows (a token-weighted average, so long
    texts weigh more, as in language-model evaluation). The prefix is given, not predicted: it is the
    same for every row of a label and would flatter the figure.
    """
    from ghostdp.integrations.hf.models import input_position_logits

    if len(data) == 0:
        raise ValueError("heldout_perplexity: no rows.")
    device = device if device is not None else next(model.parameters()).device
    rows = data.examples()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["text"]))  # similar lengths share a batch
    nll, tokens = 0.0, 0
    for s in tqdm(range(0, len(rows), batch_size), desc=desc, unit="batch", disable=not show_progress):
        batch = collator([rows[i] for i in order[s:s + batch_size]])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits = input_position_logits(model, logits, ids.shape[1])  # (B, T, V)
        labels = batch["labels"].to(device)[:, 1:]  # (B, T-1): position t predicts t+1
        shifted = logits[:, :-1]
        if shifted.dtype in (torch.float16, torch.bfloat16):  # a log-softmax over the vocabulary needs fp32
            shifted = shifted.float()
        ce = F.cross_entropy(shifted.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                             reduction="sum")
        nll += float(ce)
        tokens += int((labels != -100).sum())
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": tokens, "rows": len(rows)}


# ----------------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------------


def synthetic_texts_from_rows(rows: Sequence[dict[str, Any]], label_names: Sequence[str], source: str) -> LabelledTexts:
    """The rows of a ``synthetic.jsonl`` as :class:`LabelledTexts`."""
    return LabelledTexts(tuple(r["text"] for r in rows), tuple(r["label"] for r in rows), tuple(label_names),
                         source=source)


def _subset(n_total: int, n: int, seed: int) -> np.ndarray:
    if n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


@dataclass
class EvaluationResult:
    """Where the report went and the headline figures."""

    run_dir: Path
    report_md: Path
    metrics_json: Path
    headline: dict[str, Any]
    figures: dict[str, Any] = field(repr=False, default_factory=dict)


def _mauve(p: np.ndarray, q: np.ndarray, clusters: int | None, seed: int):
    from ghostdp.integrations.synthetic.mauve import MauveConfig, compute_mauve

    n = min(len(p), len(q))
    p, q = p[_subset(len(p), n, seed)], q[_subset(len(q), n, seed + 1)]
    k = clusters if clusters is not None else max(2, round(2 * n / 10))
    k = min(k, 2 * n)
    return compute_mauve(p, q, MauveConfig(num_clusters=k, seed=seed))


def _dp_on_real(config: RunConfig, private: LabelledTexts, heldout: LabelledTexts, embedder: Any,
                emb: Mapping[str, np.ndarray], dp_eps: float, delta: float, show_progress: bool
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The DP-on-real row (a classifier trained with DP-SGD on the private rows at ``dp_eps``) and its record."""
    ecfg = config.evaluate
    names = heldout.label_names
    dcfg = DPClassifierConfig(
        target_epsilon=dp_eps, delta=delta, steps=ecfg.dp_steps, batch_size=ecfg.dp_batch_size,
        learning_rate=ecfg.dp_learning_rate, max_grad_norm=ecfg.dp_max_grad_norm, seed=ecfg.eval_seed,
        dp_seed=config.train.dp_seed, show_progress=show_progress,
        device=eval_device(config),
    )
    if ecfg.dp_classifier == "linear_probe":
        dp = DPLinearProbe(embedder, dcfg).fit_embeddings(emb["private"], private.labels, names)
        dp_pred = dp.predict_embeddings(emb["heldout"])
        kind = "DP-SGD (ghostdp PrivacyEngine + PoissonBatchSampler) on a linear head over frozen MiniLM embeddings"
    else:
        dp = DPMiniLMClassifier(dcfg).fit(LabelledTexts(private.texts, private.labels, names, source=private.source))
        dp_pred = dp.predict(heldout.texts)
        kind = "DP-SGD (ghostdp PrivacyEngine + PoissonBatchSampler) on every MiniLM parameter + linear head"
    row = classification_metrics(heldout.labels, dp_pred, names)
    row.update({"n_train": len(private), "epsilon": dp.epsilon, "delta": delta})
    record = {"kind": kind, "epsilon": dp.epsilon, "target_epsilon": dp_eps, "delta": delta,
              "noise_multiplier": dp.noise_multiplier, "steps": ecfg.dp_steps,
              "expected_batch": min(ecfg.dp_batch_size, len(private)), "learning_rate": ecfg.dp_learning_rate}
    logger.info("accuracy[dp_on_real] = %.4f at epsilon=%.4g", row["accuracy"], dp.epsilon)
    return row, record


def evaluate_synthetic(
    *,
    synthetic: LabelledTexts,
    private: LabelledTexts,
    heldout: LabelledTexts,
    floor: LabelledTexts | None,
    embedder: Any,
    config: RunConfig,
    epsilon: float | None,
    delta: float,
    show_progress: bool = True,
    extra_train_sets: Mapping[str, LabelledTexts] | None = None,
) -> dict[str, Any]:
    """Classifiers, label fidelity, MAUVE, memorisation and lengths, from texts (no model needed).

    ``extra_train_sets``: more ``{accuracy key: training set}`` rows for the same downstream classifier
    (``eval_rows.extra_train_sets``: real_matched, public_only, synthetic_plus_public).

    Returns ``{"accuracies": {...}, "label_fidelity": ..., "mauve": ..., "memorization": ...,
    "lengths": ..., "dp_baseline": ...}``; ``epsilon``/``delta`` are the DP baseline's budget (unless
    ``evaluate.dp_epsilon`` overrides epsilon). ``epsilon`` None (a NOT private generator) without
    ``evaluate.dp_epsilon``: the DP-on-real row is None (n/a), as there is no budget to match.
    """
    from ghostdp.integrations.synthetic.memorization import memorization_report
    from ghostdp.integrations.synthetic.report import length_stats

    ecfg = config.evaluate
    names = heldout.label_names
    t0 = time.time()
    emb = {"synthetic": embedder.embed(synthetic.texts), "private": embedder.embed(private.texts),
           "heldout": embedder.embed(heldout.texts)}
    if floor is not None:
        emb["floor"] = embedder.embed(floor.texts)
    logger.info("Embedded %s texts in %.1fs", {k: len(v) for k, v in emb.items()}, time.time() - t0)

    def probe() -> Any:
        if ecfg.classifier == "linear_probe":
            return LinearProbe(embedder, LinearProbeConfig(seed=ecfg.eval_seed))
        return MiniLMClassifier(FineTuneConfig(seed=ecfg.eval_seed, show_progress=show_progress,
                                               device=eval_device(config)))

    def train_eval(key: str, train: LabelledTexts):
        present = set(train.labels)
        if len(present) < 2:
            logger.warning("accuracy[%s]: the training set has labels %s only; no classifier (n/a).", key,
                           sorted(present))
            return None, None
        clf = probe()
        if isinstance(clf, LinearProbe):
            clf.fit_embeddings(emb[key], train.labels, names)
            pred = clf.predict_embeddings(emb["heldout"])
        else:
            clf.fit(LabelledTexts(train.texts, train.labels, names, source=train.source))
            pred = clf.predict(heldout.texts)
        metrics = classification_metrics(heldout.labels, pred, names)
        metrics["n_train"] = len(train)
        logger.info("accuracy[%s] = %.4f (macro-F1 %.4f)", key, metrics["accuracy"], metrics["macro_f1"])
        return metrics, clf

    accuracies: dict[str, Any] = {}
    accuracies["synthetic"], _ = train_eval("synthetic", synthetic)
    accuracies["real_ceiling"], ceiling = train_eval("private", private)
    if accuracies["real_ceiling"] is not None:
        accuracies["real_ceiling"]["note"] = "non-private reference trained on the real private data; not a release"
    accuracies["prior_floor"] = train_eval("floor", floor)[0] if floor is not None else None
    for key, train_set in (extra_train_sets or {}).items():
        emb[key] = embedder.embed(train_set.texts)
        accuracies[key] = train_eval(key, train_set)[0]

    if epsilon is None and ecfg.dp_epsilon is None:  # a NOT private generator (epsilon inf): no budget to match
        accuracies["dp_on_real"] = None
        dp_baseline = {"kind": None, "epsilon": None,
                       "note": "not trained: the generator is NOT private (epsilon inf), so there is no epsilon to "
                               "match; set evaluate.dp_epsilon to train the DP baseline at a budget of your choice"}
        logger.info("accuracy[dp_on_real]: not trained (the generator is not private; evaluate.dp_epsilon is none)")
    else:
        accuracies["dp_on_real"], dp_baseline = _dp_on_real(config, private, heldout, embedder, emb,
                                                            planning.baseline_epsilon(ecfg.dp_epsilon, epsilon),
                                                            delta, show_progress)

    fidelity: dict[str, Any] = {}
    if ceiling is not None:
        def fid(texts: LabelledTexts, key: str):
            if isinstance(ceiling, LinearProbe):
                pred = np.asarray(ceiling.predict_embeddings(emb[key]), dtype=object)
                intended = np.asarray(texts.labels, dtype=object)
                out = {"label_fidelity": float(np.mean(pred == intended)), "n_synthetic": len(texts)}
                for name in names:
                    rows = intended == name
                    if rows.any():
                        out[f"label_fidelity/{name}"] = float(np.mean(pred[rows] == name))
                return out
            return label_fidelity(ceiling, texts)

        fidelity["synthetic"] = fid(synthetic, "synthetic")
        if floor is not None:
            fidelity["floor"] = fid(floor, "floor")

    seed = ecfg.eval_seed
    m_syn = _mauve(emb["heldout"], emb["synthetic"], ecfg.mauve_clusters, seed)
    mauve = {"synthetic": m_syn.mauve, "num_clusters": m_syn.num_clusters, "pca_components": m_syn.num_components,
             "n_per_side": int(min(len(heldout), len(synthetic)))}
    if floor is not None:
        mauve["floor"] = _mauve(emb["heldout"], emb["floor"], ecfg.mauve_clusters, seed).mauve
    mauve["real_reference"] = _mauve(emb["heldout"], emb["private"][_subset(len(private), len(synthetic), seed + 7)],
                                     ecfg.mauve_clusters, seed).mauve

    mem = memorization_report(synthetic.texts, private.texts, synthetic_embeddings=emb["synthetic"],
                              private_embeddings=emb["private"], top_k=ecfg.memorization_top_k,
                              show_progress=show_progress)
    lengths = {"heldout": length_stats(heldout.texts), "synthetic": length_stats(synthetic.texts),
               "private": length_stats(private.texts)}
    if floor is not None:
        lengths["floor"] = length_stats(floor.texts)
    return {"accuracies": accuracies, "label_fidelity": fidelity, "mauve": mauve, "mauve_curve": m_syn,
            "memorization": mem, "lengths": lengths, "dp_baseline": dp_baseline}


def _floor_samples(config: RunConfig, paths: Any, gen: Any, synthetic_counts: dict[str, int],
                   show_progress: bool, shared: Any | None = None) -> LabelledTexts | None:
    """Samples from the un-finetuned model: same prompts, sampling and label shares as the synthetic set.

    With ``shared`` (a ``shared_eval.SharedEvaluation``) the samples go to its folder for this recipe, and a
    floor made there by an earlier run is reused with the label counts it was made with.
    """
    from ghostdp.integrations.synthetic.synthesize import (
        JSONL,
        META,
        ResumeMismatchError,
        label_targets,
        read_synthetic,
        synthesize,
    )

    n = config.evaluate.floor_samples
    total = sum(synthetic_counts.values())
    n = total if n is None else n
    if n == 0:
        return None
    if n != total:
        logger.warning("The prior-knowledge floor gets %d samples and the synthetic set has %d: the floor row is "
                       "not a same-size baseline (a smaller floor trains a weaker classifier and flatters the "
                       "synthetic set). Set evaluate.floor_samples to none for as many as the synthetic set.", n, total)
    # The synthetic set's label shares are public (it is the release), so the floor may copy them.
    proportions = {k: v / total for k, v in synthetic_counts.items()} if total else None
    targets = label_targets(gen.label_names, n, per_label=False, proportions=proportions)
    info = {"model_id": f"base:{gen.info['base_model']}", "base_model": gen.info["base_model"], "finetuned": False,
            "privacy": None, "data": None}
    folder = paths.floor
    if shared is not None:
        folder = shared.floor_dir({
            "base_model": gen.info["base_model"], "labels": list(gen.label_names), "n": n,
            "prefixes": {label: list(gen.collator.prefix_ids(label)) for label in gen.label_names},
            "max_length": gen.collator.config.max_length, "sampling": dataclasses.asdict(config.synthesize),
        })
        made = shared.floor_targets(folder)
        if made is not None and made != dict(targets):
            logger.info("Reusing the shared floor %s (label counts %s; this run's shares would give %s)", folder,
                        made, dict(targets))
        targets = made or targets
    from ghostdp.integrations.synthetic.label_scoring import margin_filter_for

    with gen.base_model() as base:
        # With the label filter on, the floor is filtered by the base model's own likelihood ratio, so the
        # floor stays "what the base model gives with the same recipe", not "without the filter".
        base_filter = margin_filter_for(gen, config.synthesize.filter_margin, model=base,
                                        top_fraction=config.synthesize.filter_top_fraction)

        def run():
            synthesize(base, gen.tokenizer, gen.collator, gen.label_names, config.synthesize, folder,
                       targets=targets, model_info=info, device=gen.device, show_progress=show_progress,
                       sample_filter=base_filter)

        try:
            run()
        except ResumeMismatchError:  # made with other sampling parameters: public and cheap, so start over
            logger.info("%s was sampled with other settings; regenerating the floor", folder)
            for name in (JSONL, META):
                (folder / name).unlink(missing_ok=True)
            run()
    rows = read_synthetic(folder / JSONL)
    return synthetic_texts_from_rows(rows, gen.label_names, str(folder))


def _perplexities(config: RunConfig, gen: Any, heldout: LabelledTexts, show_progress: bool,
                  shared: Any | None = None) -> dict[str, Any]:
    """Held-out perplexity of the fine-tuned and the base model (the base figure kept in ``shared``)."""
    from ghostdp.integrations.synthetic.synthesize import make_collator

    n = config.evaluate.perplexity_rows
    if n == 0:
        return {}
    rows = heldout if n is None else heldout.subset(_subset(len(heldout), n, config.evaluate.eval_seed).tolist())
    # A longer limit than in training, so held-out texts are scored (nearly) whole.
    collator = make_collator(gen.tokenizer, {**gen.info, "max_length": max(256, int(gen.info["max_length"]))})
    out = {"finetuned": heldout_perplexity(gen.model, collator, rows, device=gen.device, show_progress=show_progress,
                                           desc="perplexity (fine-tuned)")}
    key = None if shared is None else shared.text_key(gen.info["base_model"], rows.texts, rows.labels,
                                                       [list(collator.prefix_ids(x)) for x in gen.label_names],
                                                       collator.config.max_length)
    if key is not None and key in shared.base_perplexity:
        out["base"] = shared.base_perplexity[key]
    else:
        with gen.base_model() as base:
            out["base"] = heldout_perplexity(base, collator, rows, device=gen.device, show_progress=show_progress,
                                             desc="perplexity (base)")
        if key is not None:
            shared.base_perplexity[key] = out["base"]
    logger.info("Held-out perplexity: fine-tuned %.3f, base %.3f (%d tokens)", out["finetuned"]["perplexity"],
                out["base"]["perplexity"], out["finetuned"]["tokens"])
    return out


_PRIVACY_NOTE = """\
> **Privacy.** The released artefacts are `model/` and `synthetic/`: together
> (epsilon = {eps:.4g}, delta = {delta:.3g})-DP ({eps_train:.4g} for DP-SGD fine-tuning, {eps_labels:.4g} for the
> label proportions; basic composition).
> This report is NOT a release: the "real (non-private ceiling)" classifier, the memorisation check and its
> worst cases below use the private training data directly, and quote it.
"""

_NOT_PRIVATE_NOTE = """\
> **NOT PRIVATE.** The generator was trained with epsilon = inf: no noise and no clipping. `model/` and
> `synthetic/` are NOT differentially private and must not be released; this run is a baseline for comparisons.
> The "DP-trained on real" row is n/a unless evaluate.dp_epsilon names a budget. This report uses the private
> training data directly, and quotes it.
"""


def _memorization_section(mem: Any, k: int = 5) -> str:
    def cut(s: str, n: int = 160) -> str:
        s = s.replace("|", "\\|")
        return s if len(s) <= n else s[: n - 1] + "…"

    lines = ["## Memorisation (synthetic vs private training texts)", ""]
    s = mem.summary
    lines.append(
        f"Longest common word n-gram with any private text: max {s['ngram_max']}, mean {s['ngram_mean']:.2f}; verbatim "
        f"copies of {s['verbatim_min_words']}+ words: {s['verbatim_copies']} of {s['n_synthetic']}"
        + (f"; nearest private neighbour cosine: max {s['cosine_max']:.3f}, mean {s['cosine_mean']:.3f}, "
           f"share >= 0.95: {s['frac_cosine_ge_0.95']:.3f}" if "cosine_max" in s else "") + "."
    )
    lines.append("")
    for title, cases in (("Worst cases by n-gram", mem.top_by_ngram[:k]),
                         ("Worst cases by cosine", mem.top_by_cosine[:k])):
        if not cases:
            continue
        lines += [f"{title} (PRIVATE texts quoted):", "", "| n-gram | cosine | synthetic | nearest private |",
                  "| --- | --- | --- | --- |"]
        for c in cases:
            cos = "n/a" if c.cosine is None else f"{c.cosine:.3f}"
            lines.append(f"| {c.ngram_length}/{c.synthetic_length} | {cos} | {cut(c.synthetic_text)} "
                         f"| {cut(c.private_text)} |")
        lines.append("")
    return "\n".join(lines)


def eval_device(config: RunConfig) -> str:
    """Where the evaluation's models run (``synthesize.pick_device``, as a name): "cuda" or "cpu"."""
    from ghostdp.integrations.synthetic.synthesize import pick_device

    return pick_device(config.train.use_cpu).type


def make_embedder(config: RunConfig, show_progress: bool, shared: Any | None = None) -> Any:
    """The MiniLM embedder of the evaluation (``shared``'s memoising one when given)."""
    from ghostdp.integrations.synthetic.embeddings import EmbedderConfig, MiniLMEmbedder

    device = eval_device(config)

    def make() -> Any:
        return MiniLMEmbedder(EmbedderConfig(device=device, show_progress=show_progress))

    return make() if shared is None else shared.get_embedder(make)


def evaluate_run(config: RunConfig, paths: Any, gen: Any, *, show_progress: bool = True,
                 shared: Any | None = None) -> EvaluationResult:
    """Evaluate ``paths.synthetic`` (written by the synthesize step) and write the run report.

    ``shared``: a ``shared_eval.SharedEvaluation`` whose embeddings, base perplexity and floor the runs of
    one study reuse (none: everything computed here).
    """
    from ghostdp.integrations.synthetic.report import write_run_report
    from ghostdp.integrations.synthetic.run_folder import (
        check_fingerprint,
        check_heldout_disjoint,
        load_eval_data,
        load_private_data,
        setting_differences,
    )
    from ghostdp.integrations.synthetic.synthesize import (
        META,
        read_synthetic,
        repair_csv,
    )

    started = time.time()
    jsonl = paths.synthetic / "synthetic.jsonl"
    rows = read_synthetic(jsonl)
    if not rows:
        raise ConfigError(f"{jsonl} holds no samples: run `ghostdp synthesize` with this --run-dir first.")
    try:
        syn_meta = json.loads((paths.synthetic / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{paths.synthetic / META} cannot be read ({exc}): run `ghostdp synthesize` with this "
                          "--run-dir again to rewrite it.") from exc
    if syn_meta.get("model", {}).get("model_id") != gen.info["run_id"]:
        raise ConfigError(f"{paths.synthetic} was sampled from another generator than {paths.model}; delete it and "
                          "re-run synthesize.")
    repair_csv(paths.synthetic)
    if not syn_meta.get("complete"):
        logger.warning("%s is incomplete (%s of targets %s); evaluating what is there. Re-run synthesize to finish it.",
                       paths.synthetic, syn_meta.get("counts"), syn_meta.get("targets"))
    names = gen.label_names
    synthetic = synthetic_texts_from_rows(rows, names, str(jsonl))

    # Evaluation baselines read the private data (labelled as such in the report).
    heldout = load_eval_data(config.data, names)
    private = load_private_data(config.data)
    check_heldout_disjoint(private, heldout)
    data_now = dataclasses.asdict(config.data)
    data_now.pop("eval_data"), data_now.pop("eval_rows")
    differences = setting_differences({"data": gen.info.get("training", {}).get("identity", {}).get("data")},
                                      {"data": json.loads(json.dumps(data_now))})
    check_fingerprint(private, paths, gen.info["data"]["fingerprint"], f"the [data] settings of {paths.config}",
                      differences)
    logger.info("Evaluating %s (%d samples) on %s", paths.synthetic, len(synthetic), heldout.source,
                extra={"ghostdp_commit": True})
    training = {"log": [], "seconds": None}  # private diagnostics of training (private/training.json)
    if paths.training_record.is_file():
        training = json.loads(paths.training_record.read_text(encoding="utf-8"))
    elif "log" in gen.info.get("training", {}):  # a model folder written before the record moved to private/
        training = gen.info["training"]
    private = LabelledTexts(private.texts, private.labels, names, source=private.source)

    floor = _floor_samples(config, paths, gen, syn_meta["counts"], show_progress, shared)
    ppl = _perplexities(config, gen, heldout, show_progress, shared)
    embedder = make_embedder(config, show_progress, shared)
    privacy = gen.info["privacy"]
    from ghostdp.integrations.synthetic import eval_rows

    res = evaluate_synthetic(synthetic=synthetic, private=private, heldout=heldout, floor=floor, embedder=embedder,
                             config=config, epsilon=privacy["epsilon_total"], delta=privacy["delta"],
                             show_progress=show_progress,
                             extra_train_sets=eval_rows.extra_train_sets(config, gen, private, synthetic, syn_meta))
    res["accuracies"]["generator_classifier"] = eval_rows.generator_row(config, gen, heldout,
                                                                         show_progress=show_progress)
    mem = res["memorization"]
    metrics = {
        "privacy": privacy,
        "label_release": gen.info.get("label_release"),
        "model": {**{k: gen.info[k] for k in ("base_model", "method", "trainable_parameters", "template")},
                  "chat_template": bool(gen.info.get("chat_template", False))},
        "data": {"private": private.source, "n_private": len(private), "heldout": heldout.source,
                 "n_heldout": len(heldout)},
        "synthesis": {k: syn_meta.get(k) for k in ("complete", "targets", "counts", "shortfall", "stats", "sampling",
                                                    "filter")},
        "floor": None if floor is None else {"n": len(floor), "counts": {n: floor.labels.count(n) for n in names}},
        "classifier": config.evaluate.classifier,
        "dp_baseline": res["dp_baseline"],
        "label_fidelity": res["label_fidelity"],
        "mauve": res["mauve"],
        "perplexity": ppl,
        "lengths": res["lengths"],
        "memorization": mem.summary,
        "training_seconds": training.get("seconds"),
        "evaluation_seconds": round(time.time() - started, 1),
    }
    is_dp = privacy.get("epsilon_total") is not None  # None: trained with epsilon inf (no noise, no clipping)
    kind = "DP synthetic text" if is_dp else "synthetic text (NOT private)"
    title = (f"ghostdp {kind}: {Path(config.data.train_data).name} -> {gen.info['base_model']} "
             f"({gen.info['method']})")
    # Privacy note under the title, memorisation worst cases at the end: written with the report, in one go.
    if not is_dp:
        note = _NOT_PRIVATE_NOTE
    else:
        note = _PRIVACY_NOTE.format(eps=privacy["epsilon_total"], delta=privacy["delta"],
                                    eps_train=privacy["epsilon_train"], eps_labels=privacy["epsilon_labels"])
    if is_dp and privacy.get("dp_seed") is not None:
        note = (f"> **NOT PRIVATE: trained with the known dp_seed={privacy['dp_seed']}**, so the noise can be "
                "reproduced and removed; the epsilon below holds only if the seed is secret (tests only).\n>\n"
                + note)
    if not syn_meta.get("complete"):
        note += (f"\n> **INCOMPLETE synthetic set**: {len(synthetic)} of {sum(syn_meta.get('targets', {}).values())} "
                 "samples (interrupted, or labels fell short); re-run synthesize to finish it.\n")
    from ghostdp.integrations.synthetic.label_scoring import filter_section
    from ghostdp.integrations.synthetic.run_folder import write_text_atomic

    write_text_atomic(paths.root / "memorization.json", json.dumps(mem.to_dict(), indent=2) + "\n")
    report = write_run_report(
        paths.root, title=title, metrics=metrics, training_log=training.get("log", []),
        accuracies=res["accuracies"], real_texts=heldout.texts, synthetic_texts=synthetic.texts,
        mauve=res["mauve"]["synthetic"], mauve_curve=(res["mauve_curve"].curve_x, res["mauve_curve"].curve_y),
        preamble=note, epilogue=filter_section(syn_meta.get("filter")) + _memorization_section(mem),
    )
    acc = res["accuracies"]
    headline = {
        "epsilon": privacy["epsilon_total"], "delta": privacy["delta"],
        "accuracy_synthetic": (acc["synthetic"] or {}).get("accuracy"),
        "accuracy_real_ceiling": (acc["real_ceiling"] or {}).get("accuracy"),
        "accuracy_dp_on_real": (acc["dp_on_real"] or {}).get("accuracy"),
        "accuracy_prior_floor": (acc["prior_floor"] or {}).get("accuracy"),
        "accuracy_real_matched": (acc.get("real_matched") or {}).get("accuracy"),
        "accuracy_generator_classifier": (acc.get("generator_classifier") or {}).get("accuracy"),
        "label_fidelity": (res["label_fidelity"].get("synthetic") or {}).get("label_fidelity"),
        "mauve": res["mauve"]["synthetic"],
        "perplexity": ppl.get("finetuned", {}).get("perplexity"),
        "n_synthetic": len(synthetic),
        "n_target": sum(syn_meta.get("targets", {}).values()),
        "synthetic_complete": bool(syn_meta.get("complete")),
        "dp_seed": privacy.get("dp_seed"),
    }
    logger.info("Evaluation written to %s: %s", report.report_md, headline)
    return EvaluationResult(run_dir=paths.root, report_md=report.report_md, metrics_json=report.metrics_json,
                            headline=headline, figures=report.figures)

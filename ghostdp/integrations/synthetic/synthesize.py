"""DP synthetic text: sample from the DP fine-tuned generator, label by label, resumably.

Why this is private: the generator was trained with DP-SGD, and everything here is post-processing of
it (DP is closed under post-processing), with one exception that is paid for separately: the *label
proportions*. Sampling N texts in the private data's label proportions would publish those proportions
exactly, so they are either uniform (free) or released under DP once, during training, by
:func:`release_label_counts` (discrete Laplace noise on each count, its own ``label_epsilon``, added to
the reported epsilon by basic composition). Nothing in this module reads the private data.

Generation starts from the exact prefix ids the training rows started with
(``PrefixLMCollator.prefix_ids(label)``): re-tokenizing the prefix string could merge its last
characters differently, and the generator would be conditioned on ids it never saw in training.

Files in the output folder:

``synthetic.jsonl``
    Append-only, one JSON object per sample: ``text``, ``label``, ``batch`` (the batch index within its
    label), ``n_batch`` (rows kept from that batch) and ``eos`` (whether the sample ended with EOS rather
    than at ``max_new_tokens``), plus ``margin`` when a label filter chose it (``label_scoring``). Written
    batch by batch, flushed and fsynced, so an interrupted run loses at most the batch in flight.
``synthetic.csv``
    ``text,label`` of every sample so far (rewritten at the end of each call).
``synthetic_meta.json``
    The model, its privacy figures (epsilon, delta, noise multiplier, steps, keyed data fingerprint), the
    sampling parameters, per-label targets and counts, duplicate/empty statistics, the ghostdp version,
    the seed and whether the set is complete; with a label filter, its rule and per-label acceptance rates
    (post-processing of the DP model: no privacy cost).

Resuming: run the same call again. Existing rows are counted per label, a torn last batch (fewer rows
than its ``n_batch``, or a cut line) is dropped and regenerated identically, and generation continues
with the next batch index. Batch ``b`` of label number ``l`` draws with the seed
``SeedSequence([sample_seed, l, b])``, labels are generated in order, and duplicates are judged against
everything kept before, so a resumed run writes exactly the rows an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ghostdp.engine import planning
from ghostdp.integrations.synthetic.config import SynthesizeConfig

__all__ = [
    "GENERATOR_META",
    "LabelRelease",
    "LoadedGenerator",
    "ResumeMismatchError",
    "SynthesisResult",
    "dedup_key",
    "label_targets",
    "load_generator",
    "read_synthetic",
    "release_label_counts",
    "synthesize",
]

logger = logging.getLogger(__name__)

#: Metadata file of a trained generator folder (written by ``pipeline.train``).
GENERATOR_META = "ghostdp_model.json"
JSONL = "synthetic.jsonl"
CSV = "synthetic.csv"
META = "synthetic_meta.json"


class ResumeMismatchError(ValueError):
    """The output folder holds samples made with another generator or other sampling parameters."""


# ----------------------------------------------------------------------------------------------------
# Label proportions under DP
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRelease:
    """The DP release of the label counts: what may be published (never the exact counts)."""

    epsilon: float
    noisy_counts: dict[str, int]
    proportions: dict[str, float]
    mechanism: str = "discrete Laplace (two-sided geometric), L1 sensitivity 1 (add/remove one example)"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def release_label_counts(
    counts: Mapping[str, int], epsilon: float, *, rng: np.random.Generator | None = None
) -> LabelRelease:
    """Release a label histogram with pure ``epsilon``-DP: ``noisy_c = c + Z``, ``P(Z = k) ∝ exp(-epsilon |k|)``.

    Adding or removing one example (the adjacency DP-SGD's Poisson accounting uses) changes one count by 1,
    so the L1 sensitivity is 1 and the discrete Laplace mechanism with scale 1/epsilon is epsilon-DP
    (Ghosh, Roughgarden & Sundararajan 2009, the geometric mechanism). It is sampled as the difference of
    two i.i.d. geometric variables with success probability ``1 - exp(-epsilon)``, integer-valued, so the
    floating-point attacks on a continuous Laplace (Mironov 2012) do not apply. The proportions are the
    noisy counts clamped at 0 and normalised (uniform if all clamp to 0): post-processing, free.

    Composition with DP-SGD's (epsilon_train, delta) is basic: the pair is
    (epsilon_train + epsilon, delta)-DP, which is what the run reports as its total.

    ``rng``: by default a generator seeded from OS entropy. A known seed makes the noise removable; pass
    one only in tests.
    """
    if epsilon is None:
        raise ValueError("release_label_counts: epsilon=None; need a finite number > 0 (no release: do not call).")
    epsilon = planning.label_release_epsilon(epsilon)
    if not counts:
        raise ValueError("release_label_counts: no labels to release.")
    rng = rng if rng is not None else np.random.default_rng()
    p = -math.expm1(-float(epsilon))  # 1 - exp(-epsilon), accurate for small epsilon
    noise = rng.geometric(p, size=len(counts)) - rng.geometric(p, size=len(counts))
    noisy = {label: int(c) + int(z) for (label, c), z in zip(counts.items(), noise)}
    clamped = {label: max(0, v) for label, v in noisy.items()}
    total = sum(clamped.values())
    if total == 0:
        proportions = {label: 1.0 / len(counts) for label in counts}
    else:
        proportions = {label: v / total for label, v in clamped.items()}
    return LabelRelease(epsilon=float(epsilon), noisy_counts=noisy, proportions=proportions)


def label_targets(
    label_names: Sequence[str], num_samples: int, *, per_label: bool, proportions: Mapping[str, float] | None
) -> dict[str, int]:
    """Samples to generate per label.

    ``per_label``: ``num_samples`` each. Otherwise ``num_samples`` in total, split by ``proportions``
    (uniform when None) with the largest-remainder rule, so the targets sum to ``num_samples`` exactly.
    """
    names = list(label_names)
    if not names:
        raise ValueError("label_targets: no labels.")
    if per_label:
        return {name: int(num_samples) for name in names}
    if proportions is None:
        weights = np.ones(len(names))
    else:
        missing = [n for n in names if n not in proportions]
        if missing:
            raise ValueError(f"label_targets: the proportions have no entry for labels {missing}.")
        weights = np.asarray([max(0.0, float(proportions[n])) for n in names])
        if weights.sum() <= 0:
            weights = np.ones(len(names))
    exact = weights / weights.sum() * num_samples
    base = np.floor(exact).astype(int)
    order = np.argsort(-(exact - base), kind="stable")
    for i in order[: num_samples - int(base.sum())]:
        base[i] += 1
    return {name: int(n) for name, n in zip(names, base)}


# ----------------------------------------------------------------------------------------------------
# The trained generator folder
# ----------------------------------------------------------------------------------------------------


@dataclass
class LoadedGenerator:
    """A generator ready to sample: the model (PEFT-wrapped for LoRA), its tokenizer, the training
    collator (for the exact prefix ids and the EOS id), and the folder's metadata."""

    model: torch.nn.Module
    tokenizer: Any
    collator: Any
    info: dict[str, Any]
    device: torch.device

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.info["label_names"])

    @contextlib.contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """The model before fine-tuning (the prior-knowledge floor): LoRA adapters switched off, or the base
        checkpoint reloaded for full fine-tuning."""
        if self.info.get("method") == "lora" and hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
            return
        from ghostdp.integrations.hf.models import load_causal_lm

        base, _ = load_causal_lm(self.info["base_model"])
        base.to(self.device).eval()
        try:
            yield base
        finally:
            del base


def pick_device(use_cpu: bool = False) -> torch.device:
    """CUDA when available (and not ``use_cpu``), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def make_collator(tokenizer: Any, info: Mapping[str, Any]):
    """The collator the generator was trained with, rebuilt from its metadata."""
    from ghostdp.integrations.hf.collators import CollatorConfig, PrefixLMCollator
    from ghostdp.integrations.hf.prompts import PromptTemplate

    template = PromptTemplate(template=info["template"], dataset=info["dataset_name"],
                              chat=bool(info.get("chat_template", False)), system=info.get("system_prompt", ""))
    return PrefixLMCollator(tokenizer, CollatorConfig(template=template, max_length=int(info["max_length"]),
                                                      add_bos=bool(info.get("add_bos", False))))


def load_generator(model_dir: str | Path, *, use_cpu: bool = False) -> LoadedGenerator:
    """Load a folder written by ``pipeline.train``: a PEFT adapter over its base model, or a full model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    meta_path = model_dir / GENERATOR_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no {GENERATOR_META}: it is not a generator trained by ghostdp (run `ghostdp train` "
            "first, or point --run-dir at a run folder whose model/ holds one)."
        )
    info = json.loads(meta_path.read_text(encoding="utf-8"))
    device = pick_device(use_cpu)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if info["method"] in ("lora", "prompt"):  # PEFT adapters (LoRA, or the virtual tokens of prompt tuning)
        from peft import PeftModel

        from ghostdp.integrations.hf.models import load_causal_lm

        base, _ = load_causal_lm(info["base_model"], quantization=info.get("quantization"))  # as trained
        model = PeftModel.from_pretrained(base, str(model_dir))
        if info["method"] == "prompt":
            from ghostdp.integrations.synthetic.pipeline import drop_virtual_logits

            drop_virtual_logits(model, model.active_peft_config.num_virtual_tokens)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.to(device).eval()
    eps = info["privacy"]["epsilon_total"]
    logger.info("Loaded the %s generator from %s (base %s, epsilon=%s)", info["method"], model_dir,
                info["base_model"], "inf: NOT PRIVATE" if eps is None else f"{eps:.4g}")
    return LoadedGenerator(model=model, tokenizer=tokenizer, collator=make_collator(tokenizer, info), info=info,
                           device=device)


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------


def dedup_key(text: str) -> str:
    """What counts as "the same text": whitespace runs collapsed, case folded."""
    return " ".join(text.split()).casefold()


def _clean(text: str) -> str:
    """Outer whitespace dropped and runs of spaces/tabs within a line collapsed; line and paragraph breaks
    kept (long private texts have paragraphs, and the generator learns them: they are part of the sample)."""
    lines = [" ".join(line.split()) for line in text.strip().split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


def batch_seed(sample_seed: int, label_index: int, batch_index: int) -> int:
    """The sampling seed of one batch: a function of (seed, label number, batch number) only."""
    state = np.random.SeedSequence([int(sample_seed), int(label_index), int(batch_index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module, prefix_ids: Sequence[int], *, n: int, config: SynthesizeConfig, eos_token_id: int,
    pad_token_id: int, tokenizer: Any, seed: int, device: torch.device,
) -> list[tuple[str, bool]]:
    """``n`` samples continuing ``prefix_ids``: ``[(text, ended_with_eos)]``, text cut at the first EOS.

    All rows share one prefix, so no padding is needed. The global torch RNG is forked and seeded with
    ``seed`` for this call only, so the caller's RNG state is left as it was.
    """
    from transformers import GenerationConfig

    ids = torch.tensor([list(prefix_ids)] * n, dtype=torch.long, device=device)  # (n, P)
    gen_config = GenerationConfig(
        do_sample=True, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k if config.top_k > 0 else None, max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_beams=1, repetition_penalty=1.0,
    )
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        virtual = _virtual_token_embeddings(model, n)
        if virtual is None:
            cache = _shared_prefix_cache(model, ids)
            extra = {} if cache is None else {CACHE_KEYWORD: cache}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_config,
                                 **extra)
            out = out[:, ids.shape[1]:]
        else:
            out = _generate_after_virtual_tokens(model, virtual, ids, gen_config)
    new = out.tolist()  # (n, <= max_new_tokens)
    samples = []
    for row in new:
        eos = eos_token_id in row
        if eos:
            row = row[: row.index(eos_token_id)]
        samples.append((tokenizer.decode(row, skip_special_tokens=True), eos))
    return samples


def _generate_cache_keyword() -> str:
    """The keyword of a ready cache in ``generate`` and ``forward``: ``cache`` from transformers 5.24 (where
    ``past_key_values`` is deprecated), ``past_key_values`` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


CACHE_KEYWORD = _generate_cache_keyword()


def repeated_prefix_cache(model: torch.nn.Module, rows: int, **inputs: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Run one prefix (``input_ids`` (1, P) or ``inputs_embeds`` (1, P, d)) once, unpadded, and repeat its
    key/value cache for ``rows`` rows that all start with it. Returns ``(cache, logits (1, P, V))``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    width = next(iter(inputs.values())).shape[1]
    device = next(iter(inputs.values())).device
    out = model(**inputs, attention_mask=torch.ones((1, width), dtype=torch.long, device=device), use_cache=True,
                **{CACHE_KEYWORD: cache})
    cache.batch_repeat_interleave(rows)
    return cache, out.logits


def is_prompt_learning(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a PEFT prompt-learning model (its forward prepends virtual tokens)."""
    peft_config = getattr(model, "active_peft_config", None)
    return peft_config is not None and getattr(peft_config, "is_prompt_learning", False)


def caches_prefix(model: torch.nn.Module) -> bool:
    """Whether ``model`` can continue rows after a prefix run once and cached: a Hugging Face causal LM with a
    key/value cache (``config.use_cache``); of the PEFT prompt-learning models (which prepend virtual tokens in
    every forward), prompt tuning and P-tuning, whose virtual tokens are input embeddings the base model's cache
    can hold."""
    if is_prompt_learning(model):
        from peft.utils import PeftType

        if model.active_peft_config.peft_type not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
            return False
        model = model.get_base_model()
    config = getattr(model, "config", None)
    return bool(config is not None and getattr(config, "use_cache", False)
                and not getattr(config, "is_encoder_decoder", False))


def _shared_prefix_cache(model: torch.nn.Module, ids: torch.Tensor) -> Any | None:
    """The key/value cache of the rows' common prefix minus its last token, computed once and repeated per row.

    ``ids`` (n, P) holds n copies of one prefix, so its keys and values are the same in every row: one
    forward of ``ids[:1, :-1]`` replaces n (about 30% less sampling time for n=40, 23 prefix and 13 new
    tokens on the 2-core CPU). ``generate`` then feeds only the last prefix token and the new ones; the
    sampled tokens equal those of the uncached call with the same seed (tests/synthetic/test_synthesize.py).
    None (plain ``generate``) for a model that is not a Hugging Face model with a cache, or a prefix of one token.
    """
    if ids.shape[1] < 2 or not caches_prefix(model):
        return None
    return repeated_prefix_cache(model, ids.shape[0], input_ids=ids[:1, :-1])[0]


def _virtual_token_embeddings(model: torch.nn.Module, n: int) -> torch.Tensor | None:
    """The (n, V, d) virtual-token embeddings of a PEFT prompt-tuned model, or None for any other model."""
    if not is_prompt_learning(model):
        return None
    config = model.active_peft_config
    from peft.utils import PeftType

    if config.peft_type not in (PeftType.PROMPT_TUNING, PeftType.P_TUNING):
        raise NotImplementedError(
            f"Sampling from a PEFT {config.peft_type} model is not supported: ghostdp samples prompt-learning "
            "models by prepending their virtual-token embeddings, which only prompt tuning and P-tuning have. "
            "Train with --method lora, prompt or full."
        )
    return model.get_prompt(batch_size=n)


def _generate_after_virtual_tokens(
    model: torch.nn.Module, virtual: torch.Tensor, ids: torch.Tensor, gen_config: Any
) -> torch.Tensor:
    """Sample from a prompt-tuned model: the base model generates from ``[virtual tokens, prefix]`` embeddings.

    This is the sequence the model was trained on (PEFT's forward prepends the same virtual tokens), decoded
    with the base model's own key/value cache. PEFT's ``generate`` for prompt tuning is not used: with
    transformers 5.24 and peft 0.21 it re-ran the whole sequence at every step (about 10 times slower) and its
    tokens differed from the model's forward (greedy decoding repeated a newline where the forward's argmax
    did not); tests/synthetic/test_synthesize.py checks the tokens here against the forward, step by step.
    Returns the new tokens only, (n, <= max_new_tokens).
    """
    base = model.get_base_model()
    embed = base.get_input_embeddings()
    prefix = embed(ids)
    inputs = torch.cat([virtual.to(device=prefix.device, dtype=prefix.dtype), prefix], dim=1)  # (n, V + P, d)
    mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
    # Every row starts with the same V + P embeddings: their cache (minus the last position) is computed once.
    cache, _ = repeated_prefix_cache(base, inputs.shape[0], inputs_embeds=inputs[:1, :-1])
    # Decoder-only generate() from inputs_embeds alone returns only the new tokens.
    return base.generate(inputs_embeds=inputs, attention_mask=mask, generation_config=gen_config,
                         **{CACHE_KEYWORD: cache})


@dataclass
class SynthesisResult:
    """What :func:`synthesize` left in ``out_dir``."""

    out_dir: Path
    jsonl: Path
    csv: Path
    meta: Path
    counts: dict[str, int]
    targets: dict[str, int]
    complete: bool
    stats: dict[str, int] = field(default_factory=dict)


def read_synthetic(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete batches of a ``synthetic.jsonl``.

    A cut last line, or a last batch with fewer rows than its ``n_batch`` (the run died mid-write), is
    dropped; with ``repair`` the file is truncated to the last complete batch so appending continues cleanly.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    rows: list[dict[str, Any]] = []
    ends: list[int] = []  # byte offset after each parsed row
    pos = 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        pos += len(line)
        rows.append(row)
        ends.append(pos)
    # Drop a torn trailing batch (only the last one can be torn: batches are appended in order).
    if rows:
        last = (rows[-1]["label"], rows[-1]["batch"])
        start = len(rows)
        while start > 0 and (rows[start - 1]["label"], rows[start - 1]["batch"]) == last:
            start -= 1
        if len(rows) - start < int(rows[-1]["n_batch"]):
            logger.warning("%s: the last batch (label %r, batch %d) is incomplete (%d of %d rows); it will be "
                           "regenerated", path, last[0], last[1], len(rows) - start, rows[-1]["n_batch"])
            rows = rows[:start]
            ends = ends[:start]
    keep = ends[-1] if ends else 0
    if keep != len(raw):
        if repair:
            logger.warning("%s: truncating %d bytes of an interrupted write", path, len(raw) - keep)
            with path.open("r+b") as fh:
                fh.truncate(keep)
        else:
            logger.warning("%s: ignoring %d bytes of an interrupted write", path, len(raw) - keep)
    return rows


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for r in rows:
            writer.writerow([r["text"], r["label"]])
    os.replace(tmp, path)


def _fingerprint(model_id: str, sampling: Mapping[str, Any], prefixes: Mapping[str, Sequence[int]]) -> str:
    blob = json.dumps({"model": model_id, "sampling": sampling, "prefixes": {k: list(v) for k, v in prefixes.items()}},
                      sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _resume_differences(old_meta: Mapping[str, Any] | None, model_id: str, sampling: Mapping[str, Any],
                        filter_info: Any, prefixes: Mapping[str, Sequence[int]]) -> list[str]:
    """Each setting in which a resume differs from the set on disk, as ``"name: old (on disk) -> new"``."""
    if old_meta is None:
        return []
    out = []
    old_model = (old_meta.get("model") or {}).get("model_id")
    if old_model != model_id:
        out.append(f"generator: {old_model} (on disk) -> {model_id} (another training run)")
    old_sampling = old_meta.get("sampling") or {}
    for k in sorted(set(old_sampling) | set(sampling)):
        if old_sampling.get(k) != sampling.get(k):
            out.append(f"synthesize.{k}: {old_sampling.get(k)!r} (on disk) -> {sampling.get(k)!r}")
    old_filter = old_meta.get("filter")
    if (old_filter is None) != (filter_info is None):
        out.append(f"synthesize.filter_margin: {'off' if old_filter is None else 'on'} (on disk) -> "
                   f"{'off' if filter_info is None else 'on'}")
    elif filter_info is not None and {k: old_filter.get(k) for k in filter_info} != dict(filter_info):
        out.append(f"filter: { {k: old_filter.get(k) for k in filter_info}!r} (on disk) -> {dict(filter_info)!r}")
    old_prefixes = old_meta.get("prefix_ids") or {}
    if old_prefixes and old_prefixes != {k: list(v) for k, v in prefixes.items()}:
        out.append("label prefix ids (template or tokenizer) differ")
    return out


def repair_csv(out_dir: str | Path) -> bool:
    """Bring ``synthetic.csv`` in line with the complete rows of ``synthetic.jsonl`` if it lags (a run killed
    between the two writes); returns whether it had to. Logs what it did."""
    out_dir = Path(out_dir)
    rows = read_synthetic(out_dir / JSONL)
    csv_path = out_dir / CSV
    have = None
    if csv_path.is_file():
        with csv_path.open("r", encoding="utf-8", newline="") as fh:
            have = [(r["text"], r["label"]) for r in csv.DictReader(fh)]
    if have == [(r["text"], r["label"]) for r in rows]:
        return False
    logger.warning("%s %s the %d complete rows of %s (the run was killed between the two writes); rewriting it from "
                   "the JSONL.", csv_path, "was missing, not" if have is None else f"held {len(have)} rows, not",
                   len(rows), JSONL)
    _write_csv(csv_path, rows)
    return True


def _sampling_params(config: SynthesizeConfig) -> dict[str, Any]:
    """The parameters that decide *which* samples come out (the targets only decide how many)."""
    d = asdict(config)
    for k in ("num_samples", "per_label", "label_proportions", "max_batches_factor", "filter_margin",
              "filter_top_fraction"):
        d.pop(k)  # the filter's settings: the filter actually passed to synthesize() is fingerprinted on its own
    return d


def synthesize(
    model: torch.nn.Module,
    tokenizer: Any,
    collator: Any,
    label_names: Sequence[str],
    config: SynthesizeConfig,
    out_dir: str | Path,
    *,
    targets: Mapping[str, int],
    model_info: Mapping[str, Any],
    device: torch.device | None = None,
    max_batches: int | None = None,
    on_batch: Callable[[dict[str, Any]], None] | None = None,
    show_progress: bool = True,
    sample_filter: Any | None = None,
) -> SynthesisResult:
    """Generate until every label has ``targets[label]`` unique samples (resuming what ``out_dir`` holds).

    Args:
        model, tokenizer, collator: the generator, and the ``PrefixLMCollator`` it was trained with.
        label_names: labels in generation order (the training metadata's order).
        config: sampling parameters and seed.
        out_dir: the output folder (created).
        targets: samples wanted per label (see :func:`label_targets`).
        model_info: what goes into the metadata about the model: ``model_id`` (identifies the weights;
            a resume against other weights is refused), and optionally ``model``, ``privacy`` and ``data``.
        device: where the model is (default: its parameters' device).
        max_batches: stop after this many batches in this call (the set stays incomplete and a later
            call resumes it). For time-boxed runs and tests.
        on_batch: called after each batch is on disk with ``{"label", "batch", "kept", "counts"}``.
            An exception raised there stops the run after that batch; the files stay consistent.
        sample_filter: e.g. ``label_scoring.MarginFilter``: called as ``sample_filter(label, texts)`` with a
            batch's new non-empty candidates, returns ``[(keep, score)]``; rejected samples are dropped and
            generation goes on until the targets are met (over-generation). ``sample_filter.describe()``
            goes into the metadata and the resume fingerprint, with per-label scored/accepted counts.

    Returns a :class:`SynthesisResult`; ``complete`` is False when stopped early or when a label fell short
    (a generator producing mostly duplicates or empty texts; see ``max_batches_factor``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, csv_path, meta_path = out_dir / JSONL, out_dir / CSV, out_dir / META
    device = device if device is not None else next(model.parameters()).device
    labels = list(label_names)
    unknown = sorted(set(targets) - set(labels))
    if unknown:
        raise ValueError(f"synthesize: targets for unknown labels {unknown}; labels are {labels}.")
    prefixes = {label: tuple(collator.prefix_ids(label)) for label in labels}
    if config.max_new_tokens is None:  # as long as a training row can be
        from ghostdp.integrations.synthetic.label_scoring import generation_budget

        config = replace(config, max_new_tokens=generation_budget(collator, labels))
    sampling = _sampling_params(config)
    filter_info = sample_filter.describe() if sample_filter is not None else None
    top_fraction = float((filter_info or {}).get("top_fraction", 1.0))  # the share of a batch the filter can keep
    fingerprint = _fingerprint(str(model_info["model_id"]),
                               sampling if filter_info is None else {**sampling, "filter": filter_info}, prefixes)

    try:
        old_meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    except ValueError:
        old_meta = None  # torn or edited: treated as unknown settings below
    if jsonl.is_file() and jsonl.stat().st_size > 0:
        if old_meta is None or old_meta.get("fingerprint") != fingerprint:
            diffs = _resume_differences(old_meta, str(model_info["model_id"]), sampling, filter_info, prefixes)
            raise ResumeMismatchError(
                f"{out_dir} already holds samples made with other settings: "
                + ("; ".join(diffs) if diffs else f"{meta_path.name} is missing or unreadable")
                + ". Resuming must use the same model, seed, temperature, top-p, top-k, max_new_tokens, batch size "
                "and filter: restore them, or use another output folder (or delete this one) to start over."
            )
    logger.info("Sampling into %s (targets %s)", out_dir, dict(targets), extra={"ghostdp_commit": True})
    rows = read_synthetic(jsonl, repair=True)
    stats = {"batches": 0, "generated": 0, "kept": 0, "duplicates": 0, "empty": 0, "no_eos": 0}
    if filter_info is not None:
        stats["rejected"] = 0
    if old_meta is not None and old_meta.get("fingerprint") == fingerprint:
        stats.update({k: int(v) for k, v in old_meta.get("stats", {}).items() if k in stats})
    counts = {label: 0 for label in labels}
    next_batch = {label: 0 for label in labels}
    filter_counts = {label: {"scored": 0, "accepted": 0} for label in labels}
    if filter_info is not None and old_meta is not None and old_meta.get("fingerprint") == fingerprint:
        filter_counts.update((old_meta.get("filter") or {}).get("counts", {}))
    seen: set[str] = set()
    for r in rows:
        counts[r["label"]] += 1
        next_batch[r["label"]] = max(next_batch[r["label"]], int(r["batch"]) + 1)
        seen.add(dedup_key(r["text"]))
    stats["kept"] = len(rows)
    if rows:
        logger.info("Resuming %s: %d samples on disk %s", jsonl, len(rows), counts)
    for label in labels:
        if counts[label] > targets.get(label, 0):
            logger.warning("Label %r already has %d samples, more than the target %d; keeping them all.",
                           label, counts[label], targets.get(label, 0))

    started = time.time()
    shortfall: dict[str, int] = {}

    def write_meta(complete: bool) -> None:
        meta = {
            "ghostdp_version": _version(),
            "fingerprint": fingerprint,
            "complete": complete,
            "model": {k: v for k, v in model_info.items() if k not in ("privacy", "data")},
            "privacy": model_info.get("privacy"),
            "data": model_info.get("data"),
            "label_names": labels,
            "prefix_ids": {k: list(v) for k, v in prefixes.items()},
            "sampling": sampling,
            "label_proportions": config.label_proportions if not config.per_label else "per_label",
            "targets": dict(targets),
            "counts": dict(counts),
            "shortfall": dict(shortfall),
            "stats": dict(stats),
            "seconds_this_call": round(time.time() - started, 3),
        }
        if filter_info is not None:
            meta["filter"] = {**filter_info, "counts": {k: dict(v) for k, v in filter_counts.items()},
                              "acceptance_rate": {k: (v["accepted"] / v["scored"] if v["scored"] else None)
                                                  for k, v in filter_counts.items()}}
        _write_json_atomic(meta_path, meta)

    write_meta(False)
    total_target = sum(max(targets.get(label, 0), counts[label]) for label in labels)
    bar = tqdm(total=total_target, initial=sum(counts.values()), desc="synthesize", unit="sample",
               disable=not show_progress)
    batches_this_call = 0
    stopped = False
    bs = config.gen_batch_size
    try:
        with jsonl.open("a", encoding="utf-8") as fh:
            for li, label in enumerate(labels):
                target = int(targets.get(label, 0))
                cap = math.ceil(math.ceil(target / bs) * config.max_batches_factor / top_fraction)
                while counts[label] < target:
                    b = next_batch[label]
                    if b >= cap:
                        shortfall[label] = target - counts[label]
                        logger.warning(
                            "Label %r: %d of %d unique samples after %d batches (max_batches_factor=%g); stopping this "
                            "label. The generator produces many duplicates or empty texts: raise the temperature, "
                            "or accept the shortfall.", label, counts[label], target, b, config.max_batches_factor)
                        break
                    if max_batches is not None and batches_this_call >= max_batches:
                        stopped = True
                        break
                    samples = generate_batch(
                        model, prefixes[label], n=bs, config=config, eos_token_id=collator.eos_token_id,
                        pad_token_id=collator.pad_token_id, tokenizer=tokenizer,
                        seed=batch_seed(config.sample_seed, li, b), device=device,
                    )
                    samples = [(_clean(text), eos) for text, eos in samples]
                    verdicts: list[tuple[bool, float]] | None = None
                    if sample_filter is not None:  # scored in one call, judged in order below
                        verdicts = list(sample_filter(label, [t for t, _ in samples if t]))
                    kept = []
                    j = 0  # index into verdicts (non-empty samples only)
                    for text, eos in samples:
                        if len(kept) >= target - counts[label]:
                            break
                        stats["generated"] += 1
                        if not text:
                            stats["empty"] += 1
                            continue
                        verdict = verdicts[j] if verdicts is not None else None
                        j += 1
                        key = dedup_key(text)
                        if config.dedup and key in seen:
                            stats["duplicates"] += 1
                            continue
                        row = {"text": text, "label": label, "batch": b, "eos": eos}
                        if verdict is not None:
                            filter_counts[label]["scored"] += 1
                            if not verdict[0]:
                                stats["rejected"] += 1
                                continue
                            filter_counts[label]["accepted"] += 1
                            row["margin"] = round(verdict[1], 4)
                        seen.add(key)
                        stats["no_eos"] += int(not eos)
                        kept.append(row)
                    for r in kept:
                        r["n_batch"] = len(kept)
                    if kept:  # one write per batch: a crash leaves whole batches, or a torn last one
                        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
                        fh.flush()
                        os.fsync(fh.fileno())
                    rows.extend(kept)
                    counts[label] += len(kept)
                    next_batch[label] = b + 1
                    stats["batches"] += 1
                    stats["kept"] += len(kept)
                    batches_this_call += 1
                    bar.update(len(kept))
                    write_meta(False)
                    _write_csv(csv_path, rows)  # the CSV follows the JSONL batch by batch
                    if on_batch is not None:
                        on_batch({"label": label, "batch": b, "kept": len(kept), "counts": dict(counts)})
                if stopped:
                    break
    finally:
        bar.close()
        complete = not stopped and not shortfall and all(counts[lb] >= targets.get(lb, 0) for lb in labels)
        write_meta(complete)
        _write_csv(csv_path, rows)
    logger.info("Synthesis %s: %s in %s (%d batches this call, %d duplicates and %d empty dropped in all)",
                "complete" if complete else "incomplete", counts, out_dir, batches_this_call, stats["duplicates"],
                stats["empty"])
    return SynthesisResult(out_dir=out_dir, jsonl=jsonl, csv=csv_path, meta=meta_path, counts=dict(counts),
                           targets=dict(targets), complete=complete, stats=dict(stats))


def _version() -> str:
    import ghostdp

    return ghostdp.__version__

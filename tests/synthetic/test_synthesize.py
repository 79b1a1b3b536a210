"""DP synthesis: label proportions under DP, targets, generation from the exact prefix ids, dedup, resume."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.helpers import tiny_llama

from ghostdp.integrations.hf.collators import CollatorConfig, PrefixLMCollator
from ghostdp.integrations.synthetic.config import SynthesizeConfig
from ghostdp.integrations.synthetic.synthesize import (
    ResumeMismatchError,
    batch_seed,
    dedup_key,
    generate_batch,
    label_targets,
    read_synthetic,
    release_label_counts,
    synthesize,
)

LABELS = ("negative", "positive")
WORDS = "good great bad awful the film movie plot is was very not [ ][ ]: sst2 negative positive".split()
MODEL_INFO = {"model_id": "test-model", "base_model": "tiny", "privacy": {"epsilon_total": 3.0, "delta": 1e-5,
              "noise_multiplier": 0.9, "steps": 10}, "data": {"num_examples": 60, "fingerprint": "abc"}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------------
# Label proportions under DP
# ----------------------------------------------------------------------------------------------------


def test_label_release_adds_discrete_laplace_noise_with_the_right_spread():
    """Noisy counts are integers centred on the exact counts with Var = 2 e^-eps / (1 - e^-eps)^2; the
    exact counts come out only as often as the noise is 0 on every label (never as a rule)."""
    counts = {"negative": 891, "positive": 1109}
    eps = 0.5
    rng = np.random.default_rng(0)
    draws = np.array([[r.noisy_counts[k] for k in counts] for r in
                      (release_label_counts(counts, eps, rng=rng) for _ in range(4000))])  # (4000, 2)
    noise = draws - np.array(list(counts.values()))
    a = math.exp(-eps)
    var = 2 * a / (1 - a) ** 2  # 7.83 for eps = 0.5
    assert abs(noise.mean()) < 0.25
    assert noise.var() == pytest.approx(var, rel=0.1)
    p_zero = (1 - a) / (1 + a)  # P(Z = 0) per label
    exact = np.mean(np.all(noise == 0, axis=1))
    assert exact == pytest.approx(p_zero**2, abs=0.02) and exact < 0.1
    assert len(np.unique(draws[:, 0])) > 10


def test_label_release_proportions_are_post_processed_noisy_counts():
    release = release_label_counts({"a": 3, "b": 0, "c": 5}, 1.0, rng=np.random.default_rng(1))
    assert set(release.noisy_counts) == {"a", "b", "c"} and "discrete Laplace" in release.mechanism
    clamped = {k: max(0, v) for k, v in release.noisy_counts.items()}
    assert release.proportions == pytest.approx({k: v / sum(clamped.values()) for k, v in clamped.items()})
    assert sum(release.proportions.values()) == pytest.approx(1.0)
    # Without a generator the noise comes from OS entropy: two releases differ (almost surely over 20 tries).
    outs = {tuple(release_label_counts({"a": 1000, "b": 1000}, 0.1).noisy_counts.values()) for _ in range(20)}
    assert len(outs) > 1
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            release_label_counts({"a": 1}, bad)


def test_label_targets_sum_exactly_and_follow_proportions():
    assert label_targets(LABELS, 7, per_label=False, proportions=None) == {"negative": 4, "positive": 3}
    assert label_targets(LABELS, 100, per_label=False, proportions={"negative": 0.446, "positive": 0.554}) == {
        "negative": 45, "positive": 55}
    assert label_targets(("a", "b", "c"), 10, per_label=False, proportions={"a": 1, "b": 1, "c": 1}) == {
        "a": 4, "b": 3, "c": 3}
    assert label_targets(LABELS, 5, per_label=True, proportions={"negative": 1.0, "positive": 0.0}) == {
        "negative": 5, "positive": 5}
    assert label_targets(LABELS, 9, per_label=False, proportions={"negative": 0.0, "positive": 0.0}) == {
        "negative": 5, "positive": 4}  # all clamped to 0: uniform
    with pytest.raises(ValueError, match="no entry"):
        label_targets(LABELS, 9, per_label=False, proportions={"negative": 1.0})


def test_batch_seed_depends_on_seed_label_and_batch_only():
    seeds = {batch_seed(s, l, b) for s in range(3) for l in range(2) for b in range(5)}
    assert len(seeds) == 30 and batch_seed(0, 1, 2) == batch_seed(0, 1, 2)


def test_samples_keep_their_line_and_paragraph_breaks():
    from ghostdp.integrations.synthetic.synthesize import _clean

    # Long private texts have paragraphs; a generator that learnt them releases them (outer whitespace and
    # runs of spaces within a line go, and more than one blank line becomes one).
    assert _clean("\n  The  soup was\tcold. \n\n\n\n  Service   was slow. \n") == "The soup was cold.\n\nService was slow."
    assert _clean(" a  one-line   phrase ") == "a one-line phrase"


def test_dedup_key_normalises_whitespace_and_case():
    assert dedup_key("  A  good\nfilm ") == dedup_key("a good film") != dedup_key("a good films")


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(make_word_tokenizer):
    return make_word_tokenizer(WORDS, pad=True)


@pytest.fixture(scope="module")
def collator(tokenizer):
    return PrefixLMCollator(tokenizer, CollatorConfig(max_length=16))


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    model = tiny_llama(True, vocab=len(tokenizer), dtype=torch.float32, seed=3)
    return model.eval()


class ScriptedLM(nn.Module):
    """A stand-in with ``generate``: records its inputs, emits ``choices`` tokens drawn with the (seeded)
    global RNG, then EOS, then junk after the EOS (which must be cut)."""

    def __init__(self, choices: list[list[int]], eos: int, junk: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.choices, self.eos, self.junk = choices, eos, junk
        self.calls: list[torch.Tensor] = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append(input_ids.clone())
        width = max(len(c) for c in self.choices) + 3
        rows = []
        for _ in range(input_ids.shape[0]):
            c = self.choices[int(torch.randint(len(self.choices), (1,)))]
            rows.append(c + [self.eos] + [self.junk] * (width - len(c) - 1))
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_generation_starts_from_the_collators_prefix_ids_and_stops_at_eos(tmp_path, tokenizer, collator):
    texts = ("good film", "bad film", "the plot", "very good", "not great", "great movie", "the film was bad",
             "awful plot")
    choices = [_ids(tokenizer, w) for w in texts]
    model = ScriptedLM(choices, collator.eos_token_id, junk=_ids(tokenizer, "is")[0])
    cfg = SynthesizeConfig(num_samples=3, per_label=True, gen_batch_size=4, max_new_tokens=8, max_batches_factor=10)
    res = synthesize(model, tokenizer, collator, LABELS, cfg, tmp_path, targets={"negative": 3, "positive": 3},
                     model_info=MODEL_INFO, show_progress=False)
    assert res.complete
    for call in model.calls:
        prefixes = {tuple(collator.prefix_ids(lb)) for lb in LABELS}
        assert call.shape[0] == 4 and tuple(call[0].tolist()) in prefixes
        assert all(row.tolist() == call[0].tolist() for row in call)
    rows = read_synthetic(tmp_path / "synthetic.jsonl")
    assert len(rows) == 6 and all(" is" not in r["text"] and r["eos"] for r in rows)
    assert {r["text"] for r in rows} <= set(texts)


def test_duplicates_are_dropped_and_a_degenerate_generator_stops_with_a_shortfall(tmp_path, tokenizer, collator):
    choices = [_ids(tokenizer, w) for w in ("good", "Good", "bad")]  # "Good" is unknown -> <unk> -> "" (empty)
    model = ScriptedLM(choices, collator.eos_token_id, junk=0)
    cfg = SynthesizeConfig(num_samples=4, per_label=True, gen_batch_size=4, max_new_tokens=4, max_batches_factor=3)
    res = synthesize(model, tokenizer, collator, LABELS, cfg, tmp_path, targets={"negative": 4, "positive": 4},
                     model_info=MODEL_INFO, show_progress=False)
    rows = read_synthetic(tmp_path / "synthetic.jsonl")
    keys = [dedup_key(r["text"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2  # "good" and "bad", once over both labels
    assert not res.complete and res.stats["duplicates"] > 0
    meta = json.loads(res.meta.read_text())
    assert meta["shortfall"] == {"negative": 2, "positive": 4} and meta["complete"] is False
    assert meta["stats"]["batches"] == 6  # 3 x ceil(4 / 4) batches per label, then it gives up


def _run(model, tokenizer, collator, out, **kw):
    cfg = SynthesizeConfig(num_samples=14, gen_batch_size=4, max_new_tokens=6, sample_seed=7, temperature=1.5)
    return synthesize(model, tokenizer, collator, LABELS, cfg, out, targets={"negative": 6, "positive": 8},
                      model_info=MODEL_INFO, show_progress=False, **kw)


def test_resume_after_interruption_gives_the_uninterrupted_result(tmp_path, tiny_model, tokenizer, collator):
    full = _run(tiny_model, tokenizer, collator, tmp_path / "full")
    assert full.complete and full.counts == {"negative": 6, "positive": 8}
    expected = read_synthetic(full.jsonl)
    assert len(expected) == 14 and len({dedup_key(r["text"]) for r in expected}) == 14

    # 1. Stopped after 2 batches (a time box), then resumed.
    part = _run(tiny_model, tokenizer, collator, tmp_path / "a", max_batches=2)
    assert not part.complete and json.loads(part.meta.read_text())["complete"] is False
    head = part.jsonl.read_bytes()
    assert len({r["batch"] for r in read_synthetic(part.jsonl)}) == 2
    done = _run(tiny_model, tokenizer, collator, tmp_path / "a")
    assert done.complete and done.jsonl.read_bytes().startswith(head)  # the first batches untouched
    assert read_synthetic(done.jsonl) == expected

    # 2. Killed by an exception after the third batch, then resumed.
    def boom(info):
        if info["label"] == "positive" or info["batch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, tokenizer, collator, tmp_path / "b", on_batch=boom)
    assert len(read_synthetic(tmp_path / "b" / "synthetic.jsonl")) > 0
    assert read_synthetic(_run(tiny_model, tokenizer, collator, tmp_path / "b").jsonl) == expected

    # 3. Died mid-write: a torn last batch (one row missing) and half a line; both are redone identically.
    torn = tmp_path / "c"
    _run(tiny_model, tokenizer, collator, torn, max_batches=2)
    lines = (torn / "synthetic.jsonl").read_text().splitlines(keepends=True)
    (torn / "synthetic.jsonl").write_text("".join(lines[:-1]) + lines[-1][:10])
    assert read_synthetic(_run(tiny_model, tokenizer, collator, torn).jsonl) == expected

    # Outputs: the CSV mirrors the JSONL; the metadata says what made the data.
    with open(done.csv, newline="") as fh:
        assert [(r["text"], r["label"]) for r in csv.DictReader(fh)] == [(r["text"], r["label"]) for r in expected]
    meta = json.loads(done.meta.read_text())
    assert {"ghostdp_version", "fingerprint", "complete", "model", "privacy", "data", "label_names", "prefix_ids",
            "sampling", "targets", "counts", "stats"} <= set(meta)
    assert meta["privacy"]["epsilon_total"] == 3.0 and meta["privacy"]["noise_multiplier"] == 0.9
    assert meta["data"]["fingerprint"] == "abc" and meta["model"]["model_id"] == "test-model"
    assert meta["sampling"] == {"temperature": 1.5, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6,
                                "gen_batch_size": 4, "sample_seed": 7, "dedup": True}
    assert meta["prefix_ids"] == {lb: list(collator.prefix_ids(lb)) for lb in LABELS}


def test_resume_with_other_sampling_parameters_or_weights_is_refused(tmp_path, tiny_model, tokenizer, collator):
    _run(tiny_model, tokenizer, collator, tmp_path, max_batches=1)
    cfg = SynthesizeConfig(num_samples=14, gen_batch_size=4, max_new_tokens=6, sample_seed=7, temperature=1.0)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(ResumeMismatchError, match=r"synthesize\.temperature: 1\.5 \(on disk\) -> 1\.0\."):
        synthesize(tiny_model, tokenizer, collator, LABELS, cfg, tmp_path, targets={"negative": 6, "positive": 8},
                   model_info=MODEL_INFO, show_progress=False)
    with pytest.raises(ResumeMismatchError, match=r"generator: test-model \(on disk\) -> other \(another training run\)\."):
        synthesize(tiny_model, tokenizer, collator, LABELS,
                   SynthesizeConfig(num_samples=14, gen_batch_size=4, max_new_tokens=6, sample_seed=7, temperature=1.5),
                   tmp_path, targets={"negative": 6, "positive": 8}, model_info={**MODEL_INFO, "model_id": "other"},
                   show_progress=False)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # a refusal writes nothing


def test_generation_leaves_the_global_rng_alone(tmp_path, tiny_model, tokenizer, collator):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    _run(tiny_model, tokenizer, collator, tmp_path, max_batches=1)
    assert torch.equal(torch.rand(3), before)


# ----------------------------------------------------------------------------------------------------
# Sampling follows the trained model's own forward, for every fine-tuning method
# ----------------------------------------------------------------------------------------------------


def _trained_like(method: str, tokenizer) -> nn.Module:
    """The tiny model as each app method leaves it: PEFT LoRA, PEFT prompt tuning (random virtual tokens), or full."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    base = tiny_llama(True, vocab=len(tokenizer), dtype=torch.float32, seed=5)
    with torch.no_grad():  # large weights, so the continuation depends on every input (the default init repeats)
        for name, p in base.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.5)
    if method == "full":
        return base.eval()
    torch.manual_seed(2)
    if method == "lora":
        config = LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    model = get_peft_model(base, config)
    if method == "prompt":
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(0.0, 1.0)
    return model.eval()


@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_sampled_tokens_are_the_trained_forwards_argmax_step_by_step(method, tokenizer, collator):
    # top_k=1 turns sampling into the argmax. The reference re-runs the model's forward (the one DP training
    # differentiates: PEFT prepends the virtual tokens there) on the whole sequence at every step, no cache.
    model = _trained_like(method, tokenizer)
    prefix = collator.prefix_ids("positive")
    cfg = SynthesizeConfig(top_k=1, max_new_tokens=6)
    got = generate_batch(model, prefix, n=2, config=cfg, eos_token_id=collator.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, seed=0, device=torch.device("cpu"))
    seq = torch.tensor([prefix])
    new: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax())
            if nxt == collator.eos_token_id:
                break
            new.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    want = tokenizer.decode(new, skip_special_tokens=True)
    assert got == [(want, len(new) < 6)] * 2
    if method == "prompt":  # the virtual tokens matter here: the same base without them continues differently
        base_got = generate_batch(model.get_base_model(), prefix, n=1, config=cfg, eos_token_id=collator.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, seed=0,
                                  device=torch.device("cpu"))
        assert base_got[0][0] != want


def test_a_chat_template_generator_is_rebuilt_from_its_metadata_with_the_prefix_it_was_trained_on(smollm_tokenizer):
    from ghostdp.integrations.synthetic.synthesize import make_collator

    info = {"template": "Write one sentence from a {label} movie review.", "dataset_name": "sst2",
            "chat_template": True, "system_prompt": "", "max_length": 48}
    trained = make_collator(smollm_tokenizer, info)  # as pipeline.train builds it
    reloaded = make_collator(smollm_tokenizer, json.loads(json.dumps(info)))  # from model/ghostdp_generator.json
    plain = make_collator(smollm_tokenizer, {**info, "chat_template": False})
    for label in ("negative", "positive"):
        assert reloaded.prefix_ids(label) == trained.prefix_ids(label)
        assert trained.prefix_ids(label) != plain.prefix_ids(label)
        assert smollm_tokenizer.decode(trained.prefix_ids(label)).endswith("<|im_start|>assistant\n")
    # Metadata written before the option existed rebuilds the plain prefix.
    old = {k: v for k, v in info.items() if k not in ("chat_template", "system_prompt")}
    assert make_collator(smollm_tokenizer, old).prefix_ids("positive") == plain.prefix_ids("positive")


@pytest.mark.parametrize("method", ["full", "lora", "prompt"])
def test_the_shared_prefix_cache_samples_the_same_tokens_as_an_uncached_generate(method, tokenizer, collator):
    # generate_batch computes the common prefix once and repeats its cache over the rows; with the same seed,
    # the sampled rows must be those of a plain generate() that runs the prefix of every row.
    from transformers import GenerationConfig

    from ghostdp.integrations.synthetic.synthesize import _shared_prefix_cache

    model = _trained_like(method, tokenizer)
    prefix = collator.prefix_ids("negative")
    cfg = SynthesizeConfig(temperature=1.0, top_p=0.9, max_new_tokens=7)
    got = generate_batch(model, prefix, n=5, config=cfg, eos_token_id=collator.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, seed=11, device=torch.device("cpu"))
    ids = torch.tensor([list(prefix)] * 5)
    gen_config = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9, top_k=None, max_new_tokens=7,
                                  eos_token_id=collator.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(11)
        if method == "prompt":  # the base model from [virtual tokens, prefix] embeddings, every row whole
            base = model.get_base_model()
            embeds = torch.cat([model.get_prompt(batch_size=5), base.get_input_embeddings()(ids)], dim=1)
            plain = base.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                  generation_config=gen_config)
        else:
            assert _shared_prefix_cache(model, ids) is not None  # the path under test is taken
            plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
            plain = plain[:, ids.shape[1]:]
    want = []
    for row in plain.tolist():
        eos = collator.eos_token_id in row
        want.append((tokenizer.decode(row[: row.index(collator.eos_token_id)] if eos else row,
                                      skip_special_tokens=True), eos))
    assert got == want
    assert len(set(got)) > 1  # the rows really were sampled, not one argmax repeated

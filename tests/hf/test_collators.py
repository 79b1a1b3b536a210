"""Prefix-LM collator masking, prompt templates and the per-example LM loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ghostdp.integrations.hf.collators import (
    IGNORE_INDEX,
    CollatorConfig,
    PrefixLMCollator,
    per_example_lm_loss,
)
from ghostdp.integrations.hf.prompts import PromptTemplate

EXAMPLES = [
    {"text": "a gripping , well-acted film", "label": "positive"},
    {"text": "flat", "label": "negative"},
    {"text": "it 's a charming and often affecting journey .", "label": "positive"},
]


def check_row(batch, i, prefix_ids, text_ids, eos, pad):
    """Row i is exactly prefix + text + EOS + padding, with the mask and labels the docs promise."""
    n_p, n_t = len(prefix_ids), len(text_ids)
    n = n_p + n_t + 1
    ids, mask, labels = batch["input_ids"][i], batch["attention_mask"][i], batch["labels"][i]
    assert ids[:n].tolist() == [*prefix_ids, *text_ids, eos]
    assert (ids[n:] == pad).all()
    assert mask[:n].tolist() == [1] * n and (mask[n:] == 0).all()
    assert (labels[:n_p] == IGNORE_INDEX).all()  # the prefix is given, not scored
    assert labels[n_p:n].tolist() == [*text_ids, eos]  # text and the EOS that ends it are scored
    assert (labels[n:] == IGNORE_INDEX).all()  # padding is not scored


def test_prompt_template():
    t = PromptTemplate()
    assert t.prefix("positive") == "[sst2][positive]: "
    assert PromptTemplate("<{label}> ", dataset="imdb").prefix("neg") == "<neg> "
    assert PromptTemplate("{dataset}/{label}: ", dataset="yelp").prefixes(["1", "2"]) == {"1": "yelp/1: ", "2": "yelp/2: "}
    with pytest.raises(ValueError, match=r"no \{label\}"):
        PromptTemplate("[{dataset}]: ")
    with pytest.raises(ValueError, match=r"\['topic'\]"):
        PromptTemplate("[{topic}][{label}]")


def test_smollm2_masking_with_pad_equal_to_eos(smollm_tokenizer):
    tok = smollm_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the case where masking by token id would go wrong
    collator = PrefixLMCollator(tok)
    batch = collator(EXAMPLES)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].dtype == torch.long
    for i, ex in enumerate(EXAMPLES):
        prefix_ids = tok(PromptTemplate().prefix(ex["label"]), add_special_tokens=False)["input_ids"]
        text_ids = tok(ex["text"], add_special_tokens=False)["input_ids"]
        assert list(collator.prefix_ids(ex["label"])) == prefix_ids
        check_row(batch, i, prefix_ids, text_ids, tok.eos_token_id, tok.pad_token_id)
        scored = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        # (clean_up_tokenization_spaces=False: transformers 4.x defaults it to True for this tokenizer, " ," -> ",")
        assert tok.decode(scored[:-1], clean_up_tokenization_spaces=False) == ex["text"]  # the text itself
    # Padding positions hold the EOS id too, yet only one EOS per row is scored.
    short = 1
    assert (batch["input_ids"][short] == tok.eos_token_id).sum() > 1
    assert (batch["labels"][short] == tok.eos_token_id).sum() == 1


def test_chat_template_prefix_is_the_user_turn_and_the_text_the_assistants_reply(smollm_tokenizer):
    tok = smollm_tokenizer
    template = PromptTemplate("Write one sentence from a {label} movie review.", chat=True)
    collator = PrefixLMCollator(tok, CollatorConfig(template=template, max_length=64))
    prefix = template.prefix_text("positive", tok)
    # SmolLM2's format: an (empty) system turn, the instruction as the user turn, then the assistant header.
    assert prefix == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWrite one sentence from a positive movie "
                      "review.<|im_end|>\n<|im_start|>assistant\n")
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    assert list(collator.prefix_ids("positive")) == prefix_ids
    assert tok.convert_ids_to_tokens(prefix_ids[:1]) == ["<|im_start|>"]  # special tokens parsed, not spelled out
    batch = collator(EXAMPLES)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    assert collator.eos_token_id == end_of_turn  # the chat format's stop, whatever tok.eos_token says
    for i, ex in enumerate(EXAMPLES):
        p_ids = tok(template.prefix_text(ex["label"], tok), add_special_tokens=False)["input_ids"]
        # The reply ends with the end-of-turn token: scored, so the model learns to stop there.
        check_row(batch, i, p_ids, tok(ex["text"], add_special_tokens=False)["input_ids"], end_of_turn,
                  collator.pad_token_id)
    # transformers 4.57 reads this GGUF with eos_token '<|im_start|>'; the plain-prefix collator keeps that EOS.
    assert PrefixLMCollator(tok).eos_token_id == tok.eos_token_id
    # system=None: the chat template's own default system message; labels still get distinct prefixes.
    default = PromptTemplate("Write a {label} review.", chat=True, system=None)
    assert "SmolLM" in default.prefix_text("negative", tok)
    assert default.prefix_text("negative", tok) != default.prefix_text("positive", tok)


def test_chat_template_refusals(make_word_tokenizer, smollm_tokenizer):
    words = make_word_tokenizer(["good", "bad"], pad=True)
    template = PromptTemplate("Write a {label} review.", chat=True)
    with pytest.raises(ValueError, match="no chat template"):
        PrefixLMCollator(words, CollatorConfig(template=template)).prefix_ids("good")
    with pytest.raises(ValueError, match="add_bos=True with a chat template"):
        CollatorConfig(template=template, add_bos=True)
    assert template.prefix("good") == "Write a good review."  # the instruction itself is still the plain fill


def test_prefix_and_text_tokenized_apart(smollm_tokenizer):
    """Joint tokenization would merge the prefix's trailing space into the text's first token."""
    tok = smollm_tokenizer
    prefix = PromptTemplate().prefix("positive")
    joint = tok(prefix + "a great movie", add_special_tokens=False)["input_ids"]
    apart = PrefixLMCollator(tok)([{"text": "a great movie", "label": "positive"}])["input_ids"][0].tolist()
    p_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    assert joint[: len(p_ids)] != p_ids  # so no mask over the joint ids could cut exactly at the prefix
    assert apart[: len(p_ids)] == p_ids


def test_truncation_keeps_prefix_and_drops_eos(smollm_tokenizer):
    """A cut text ends without EOS (its last kept tokens scored); a text that fits ends with a scored EOS."""
    tok = smollm_tokenizer
    ex = EXAMPLES[2]
    prefix_ids = tok(PromptTemplate().prefix(ex["label"]), add_special_tokens=False)["input_ids"]
    text_ids = tok(ex["text"], add_special_tokens=False)["input_ids"]
    max_len = len(prefix_ids) + 4
    assert len(prefix_ids) + len(text_ids) + 1 > max_len
    collator = PrefixLMCollator(tok, CollatorConfig(max_length=max_len))
    batch = collator([ex, EXAMPLES[1]])
    assert batch["input_ids"].shape[1] == max_len
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.tolist() == [*prefix_ids, *text_ids[:4]]  # the EOS's slot holds one more text token
    assert (labels[: len(prefix_ids)] == IGNORE_INDEX).all()
    assert labels[len(prefix_ids):].tolist() == text_ids[:4]  # all kept text tokens scored, the last one too
    assert tok.eos_token_id not in labels.tolist()
    flat_ids = tok(EXAMPLES[1]["text"], add_special_tokens=False)["input_ids"]
    check_row(batch, 1, collator.prefix_ids("negative"), flat_ids, tok.eos_token_id, tok.pad_token_id)
    assert collator.encode([ex])[0].truncated and not collator.encode([EXAMPLES[1]])[0].truncated
    # Exactly room for prefix + EOS: a cut text keeps one text token and no EOS; an empty text keeps its EOS.
    tight = PrefixLMCollator(tok, CollatorConfig(max_length=len(prefix_ids) + 1))
    assert tight([ex])["input_ids"][0].tolist() == [*prefix_ids, text_ids[0]]
    check_row(tight([{"text": "", "label": ex["label"]}]), 0, prefix_ids, [], tok.eos_token_id, tok.pad_token_id)
    with pytest.raises(ValueError, match="cannot hold the"):
        PrefixLMCollator(tok, CollatorConfig(max_length=len(prefix_ids)))([ex])


@pytest.mark.parametrize("pad_to", ["longest", "max_length"])
def test_a_row_longer_than_max_length_never_ends_with_eos(make_word_tokenizer, pad_to):
    """Issue 11: an EOS after a cut row teaches "stop after max_length tokens"; only whole texts end with EOS."""
    words = "[ sst2 ][ ]: positive negative a b c d e f g h".split()
    tok = make_word_tokenizer(words, pad=False)  # pad == EOS: the hardest case for telling them apart
    rows = [{"text": " ".join("abcdefgh"[: n]), "label": lb} for n in range(0, 9) for lb in ("positive", "negative")]
    collator = PrefixLMCollator(tok, CollatorConfig(max_length=8, pad_to=pad_to))
    batch = collator(rows)
    eos = tok.eos_token_id
    for i, (row, enc) in enumerate(zip(rows, collator.encode(rows))):
        n = int(batch["attention_mask"][i].sum())
        n_text = len(row["text"].split())
        fits = len(collator.prefix_ids(row["label"])) + n_text + 1 <= 8  # text and its EOS fit
        assert enc.truncated == (not fits)
        last_scored = batch["labels"][i][n - 1].item()
        if enc.truncated:
            assert n == 8 and eos not in batch["labels"][i].tolist() and last_scored != eos
            assert eos not in batch["input_ids"][i, :n].tolist()
        else:
            assert last_scored == eos and batch["labels"][i].tolist().count(eos) == 1
    assert any(e.truncated for e in collator.encode(rows)) and not all(e.truncated for e in collator.encode(rows))


def test_word_tokenizer_with_distinct_pad_and_fixed_width(make_word_tokenizer):
    words = "[ sst2 ][ ]: positive negative a great film flat".split()
    tok = make_word_tokenizer(words, pad=True)
    assert tok.pad_token_id != tok.eos_token_id
    collator = PrefixLMCollator(tok, CollatorConfig(max_length=16, pad_to="max_length"))
    exs = [{"text": "a great film", "label": "positive"}, {"text": "flat", "label": "negative"}]
    batch = collator(exs)
    assert batch["input_ids"].shape == (2, 16)
    for i, ex in enumerate(exs):
        prefix_ids = tok(PromptTemplate().prefix(ex["label"]), add_special_tokens=False)["input_ids"]
        check_row(batch, i, prefix_ids, tok(ex["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id, tok.pad_token_id)


def test_missing_pad_falls_back_to_eos_and_bos_is_unscored(make_word_tokenizer):
    tok = make_word_tokenizer("[ sst2 ][ ]: positive good".split(), pad=False, bos=True)
    assert tok.pad_token_id is None
    collator = PrefixLMCollator(tok, CollatorConfig(add_bos=True))
    assert collator.pad_token_id == tok.eos_token_id
    batch = collator([{"text": "good good good", "label": "positive"}, {"text": "good", "label": "positive"}])
    prefix_ids = [tok.bos_token_id, *tok("[sst2][positive]: ", add_special_tokens=False)["input_ids"]]
    good = tok("good", add_special_tokens=False)["input_ids"]
    check_row(batch, 0, prefix_ids, good * 3, tok.eos_token_id, tok.eos_token_id)
    check_row(batch, 1, prefix_ids, good, tok.eos_token_id, tok.eos_token_id)
    with pytest.raises(ValueError, match="no bos_token_id"):
        PrefixLMCollator(make_word_tokenizer(["x"], pad=True), CollatorConfig(add_bos=True))


def test_empty_batch_and_bad_examples(make_word_tokenizer):
    tok = make_word_tokenizer(["x"], pad=True)
    collator = PrefixLMCollator(tok)
    empty = collator([])  # Poisson sampling can draw an empty batch
    assert all(v.shape == (0, 0) for v in empty.values())
    fixed = PrefixLMCollator(tok, CollatorConfig(max_length=8, pad_to="max_length"))([])
    assert fixed["labels"].shape == (0, 8)
    with pytest.raises(ValueError, match="'text' and 'label' keys"):
        collator([("positive", "x")])
    with pytest.raises(ValueError, match="max_length"):
        CollatorConfig(max_length=1)


# ----------------------------------------------------------------------------------------------------
# per_example_lm_loss
# ----------------------------------------------------------------------------------------------------


def loop_loss(logits, labels):
    """One example, one position at a time: mean over its scored targets of -log softmax."""
    out = []
    for i in range(logits.shape[0]):
        terms = []
        for t in range(1, logits.shape[1]):
            y = int(labels[i, t])
            if y != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[i, t - 1].double(), dim=-1)[y])
        out.append(torch.stack(terms).mean() if terms else torch.tensor(0.0, dtype=torch.float64))
    return torch.stack(out)


def test_per_example_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[0, :3] = IGNORE_INDEX  # prefix
    labels[1, 5:] = IGNORE_INDEX  # padding
    labels[2, 1:] = IGNORE_INDEX  # no targets at all -> 0
    labels[3, 0] = 5  # position 0 is never a target (nothing predicts it)
    got = per_example_lm_loss(logits, labels)
    assert got.shape == (4,) and got.dtype == torch.float64
    torch.testing.assert_close(got, loop_loss(logits, labels))
    assert got[2] == 0
    # The mean is over the example's own targets, not the batch's: not the HF batch-mean.
    batch_mean = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert not torch.allclose(got.mean(), batch_mean)


def test_per_example_loss_upcasts_half_precision_and_checks_shapes():
    logits = torch.randn(2, 5, 300).to(torch.bfloat16)
    labels = torch.randint(0, 300, (2, 5))
    got = per_example_lm_loss(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_loss(logits.float(), labels), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        per_example_lm_loss(logits, labels[:, :4])


def test_gradient_of_one_loss_touches_only_its_example():
    logits = torch.randn(3, 6, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (3, 6))
    per_example_lm_loss(logits, labels)[1].backward()
    assert logits.grad[1].abs().sum() > 0
    assert logits.grad[0].abs().sum() == 0 and logits.grad[2].abs().sum() == 0


def test_loss_of_one_example_ignores_the_rest_of_the_batch(make_word_tokenizer):
    """Through a real causal LM: changing another example, and so this one's padding, changes nothing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    words = "[ sst2 ][ ]: positive negative a great film flat dull and long but very kind".split()
    tok = make_word_tokenizer(words, pad=True)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).double().eval()
    collator = PrefixLMCollator(tok)

    def losses(examples):
        batch = collator(examples)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_example_lm_loss(logits, batch["labels"])

    mine = {"text": "a great film", "label": "positive"}
    alone = losses([mine])[0]
    short_other = losses([mine, {"text": "flat", "label": "negative"}])[0]
    long_other = losses([mine, {"text": "dull and long but very kind and very long and dull", "label": "negative"}])[0]
    with_more = losses([{"text": "kind", "label": "positive"}, mine, mine])[1]
    torch.testing.assert_close(short_other, alone, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(long_other, alone, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(with_more, alone, atol=1e-10, rtol=1e-10)

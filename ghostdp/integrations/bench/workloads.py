"""What is measured: a model setting (:class:`Case`) with an engine attached, one optimizer step at a time.

One function sets a run up (:func:`setup`: model, optional LoRA, optimizer, batch, engine) and the speed and
the memory figures both come from the ``step`` it returns, so the engines differ in the engine alone: the
same weights, the same batch of token ids, AdamW, the same per-example loss
(:func:`ghostdp.engine.loss.per_example_lm_loss`, mean over the batch), C = 1 and sigma = 1 (engine names:
:mod:`ghostdp.integrations.bench.engines`; Opacus: :mod:`ghostdp.integrations.bench.opacus_adapter`).

Models are randomly initialised Llama presets (:data:`PRESETS`), the embedded SmolLM2-135M, a Hugging Face
hub name, a local folder or a ``.gguf`` file; GGUF sources are converted once per run
(:func:`cache_weights`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ghostdp.integrations.bench.engines import (
    LR,
    MAX_GRAD_NORM,
    NOISE_MULTIPLIER,
    EngineSpec,
    parse_engine,
)
from ghostdp.integrations.bench.opacus_adapter import attach_opacus

#: Randomly initialised Llama configurations (random weights time and weigh the same as trained ones).
PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized, tied embeddings like SmolLM2.
    "tiny-llama": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=2048),
    # Llama-2-7B sizes.
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                      max_position_embeddings=4096),
    # A ~1.1B Llama (TinyLlama-1.1B sizes), for full fine-tuning on one GPU.
    "llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                     max_position_embeddings=4096),
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Case:
    """One model setting every engine is run on.

    ``model`` is a preset (:data:`PRESETS`), ``"smollm2-135m"`` (the embedded model), a Hugging Face hub
    name, a local folder or a ``.gguf`` file. ``lora``: PEFT LoRA of rank ``lora_rank`` on all linear
    layers (base frozen); otherwise every parameter trains. ``untie_embeddings`` gives the LM head its
    own copy of a tied embedding matrix, for every engine of the case. ``quantization="4bit"`` (QLoRA, needs
    ``lora``) loads the frozen base in NF4 with bitsandbytes before the adapters are added.
    """

    model: str
    lora: bool
    seq_len: int
    batch_size: int
    device: str = "cpu"
    dtype: str = "float32"
    untie_embeddings: bool = False
    lora_rank: int = 16
    quantization: str | None = None

    def __post_init__(self):
        if self.quantization not in (None, "4bit") or (self.quantization and not self.lora):
            raise ValueError(f"quantization must be None or '4bit' (with lora=True), got {self.quantization!r}")
        for name in ("seq_len", "batch_size", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (the loss scores tokens 1..T-1), got {self.seq_len}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def mode(self) -> str:
        return ("qlora" if self.quantization else "lora") if self.lora else "full"

    @property
    def id(self) -> str:
        untied = "-untied" if self.untie_embeddings else ""
        short = Path(self.model).name if ("/" in self.model or self.model.endswith(".gguf")) else self.model
        return f"{short}-{self.mode}{untied}-T{self.seq_len}-B{self.batch_size}-{self.device.split(':')[0]}"


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def needs_weight_cache(model: str) -> bool:
    """GGUF sources are dequantised on every load (~20 s for SmolLM2): convert them once per run."""
    from ghostdp.integrations.hf.models import EMBEDDED_SMOLLM2

    return model == EMBEDDED_SMOLLM2 or model.endswith(".gguf")


def cache_weights(model: str, directory: str | Path) -> str:
    """Load ``model`` once; save its config and weights (safetensors) under ``directory``; return the folder.

    Hugging Face refuses ``save_pretrained`` on a GGUF-loaded model (it counts as quantized even though
    the weights were dequantised to fp32), so the config and the state are written directly.
    """
    from safetensors.torch import save_model

    from ghostdp.integrations.hf.models import load_causal_lm

    out = Path(directory) / Path(model).name.replace(".gguf", "")
    if not (out / "model.safetensors").exists():
        loaded, _ = load_causal_lm(model)
        out.mkdir(parents=True, exist_ok=True)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.to_json_file(out / "config.json")
        save_model(loaded, str(out / "model.safetensors"))  # handles the tied embedding / LM head
        del loaded
    return str(out)


def _load_cached(weights_dir: str, dtype, device: str):
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(weights_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    load_model(model, str(Path(weights_dir) / "model.safetensors"))
    return model.to(device)


def build_model(case: Case, *, weights_dir: str | None = None, seed: int = 0):
    """The causal LM of ``case`` on its device and dtype, LoRA applied, in train mode."""
    import torch

    dtype = _torch_dtype(case.dtype)
    torch.manual_seed(seed)
    if case.model in PRESETS:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**PRESETS[case.model])
        # Built directly on the device: the weights are allocated once, where they are measured.
        with torch.device(case.device):
            model = LlamaForCausalLM._from_config(config, dtype=dtype)
    elif weights_dir is not None:
        model = _load_cached(weights_dir, dtype, case.device)
    else:
        from ghostdp.integrations.hf.models import load_causal_lm

        model, _ = load_causal_lm(case.model, dtype=dtype)
        model = model.to(case.device)
    if case.untie_embeddings:
        _untie(model)
    if case.quantization is not None:
        model = _reload_quantized(model, case, dtype)
    if case.lora:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=case.lora_rank, lora_alpha=2 * case.lora_rank,
                                                 lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    return model


def _reload_quantized(model, case: Case, dtype):
    """``model`` saved and reloaded with ``case.quantization`` (bitsandbytes NF4 computing in ``dtype``)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from ghostdp.integrations.hf.models import quantization_config

    with tempfile.TemporaryDirectory(prefix="ghostdp-bench-") as tmp:
        model.save_pretrained(tmp)
        del model
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map=case.device,
                                                    quantization_config=quantization_config(case.quantization, dtype))


def _untie(model) -> None:
    from torch import nn

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False


# ----------------------------------------------------------------------------------------------- setup

@dataclass
class Workload:
    """What :func:`setup` built; ``step()`` runs one optimizer step (synchronised on CUDA)."""

    case: Case
    engine: EngineSpec
    model: Any
    optimizer: Any
    step: Callable[[], None]
    trainable: int

def setup(case: Case, engine: str | EngineSpec, *, weights_dir: str | None = None, seed: int = 0) -> Workload:
    """Build ``case`` with ``engine`` attached: the one setup behind every speed and memory figure.

    Raises whatever the engine raises on a model it does not support (the callers turn it into an
    "unsupported" row).
    """
    import torch

    spec = parse_engine(engine) if isinstance(engine, str) else engine
    if spec.family == "ghostdp" and spec.impl == "triton" and not case.device.startswith("cuda"):
        raise NotImplementedError("the Triton kernels need CUDA (the CPU interpreter is no benchmark)")
    model = build_model(case, weights_dir=weights_dir, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (case.batch_size, case.seq_len), generator=gen)
    ids = ids.to(case.device)  # (B, T)
    labels = ids
    cuda = case.device.startswith("cuda")
    loss_of = None  # logits -> what .backward() is called on

    if spec.family == "ghostdp":
        from ghostdp.engine.privacy_engine import PrivacyEngine

        PrivacyEngine(model, optimizer, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=case.batch_size,
                      noise_multiplier=NOISE_MULTIPLIER, loss_reduction="mean", clipping=spec.clipping,
                      impl=spec.impl, generator=torch.Generator(device=case.device).manual_seed(seed))
    elif spec.family == "opacus":
        model, optimizer, loss_of = attach_opacus(model, optimizer, ids, spec.opacus_mode, case, seed)

    if loss_of is None:
        from ghostdp.engine.loss import per_example_lm_loss

        def loss_of(logits):
            return per_example_lm_loss(logits, labels).mean()

    def step() -> None:
        with warnings.catch_warnings():
            # Opacus' full backward hooks warn on every frozen-input module; not a result.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            logits = model(input_ids=ids).logits  # (B, T, V)
            loss_of(logits).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    return Workload(case, spec, model, optimizer, step, sum(p.numel() for p in params))

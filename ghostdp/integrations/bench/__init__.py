"""ghostdp against non-private training and Opacus: peak memory, step time, largest batch; ``ghostdp bench``.

One function sets a run up (:func:`setup`: model, optional LoRA, optimizer, batch, engine) and the speed and
the memory figures both come from the ``step`` it returns, so the engines differ in the engine alone: the
same weights, the same batch of token ids, AdamW, the same per-example loss
(:func:`ghostdp.engine.loss.per_example_lm_loss`, mean over the batch), C = 1 and sigma = 1.

Engines (``parse_engine`` reads the names):

- ``non-private``: ``loss.backward(); optimizer.step()``.
- ``ghostdp-<clipping>-<impl>``: :class:`ghostdp.PrivacyEngine` with ``clipping`` auto / ghost / per_sample and
  ``impl`` torch (the PyTorch twins) or triton (fused kernels, CUDA only).
- ``opacus-hooks``: Opacus' ``PrivacyEngine.make_private(grad_sample_mode="hooks")``, per-example gradients
  instantiated by its ``GradSampleModule``; layers without a grad sampler (Hugging Face RMSNorm) go
  through its functorch fallback.
- ``opacus-ghost``: ``make_private(grad_sample_mode="ghost")`` with the fast-gradient-clipping loss wrapper it
  returns (two backward passes). Opacus refuses tied parameters there (``NotImplementedError``): the row
  says "unsupported" and why. ``Case(untie_embeddings=True)`` gives every engine of that case the same
  untied model (an LM head of its own), which keeps the comparison fair.

Memory is measured in a fresh process per (case, engine) (:func:`measure_in_subprocess`), as the peak over
two training steps of everything the process holds, weights and optimizer state included:

- CUDA: ``torch.cuda.max_memory_allocated()`` (peak reset after setup, so model loading does not count).
- CPU: peak RSS (``VmHWM``, reset after setup through ``/proc/self/clear_refs``) minus the RSS the process
  had after importing torch, transformers, peft, opacus and ghostdp and running a throwaway miniature
  step (identical for every engine), so the ratios are not diluted by libraries and first-use buffers.
  The process runs with glibc's mmap threshold fixed at 64 KiB, so a freed tensor leaves RSS and the
  peak follows what was alive rather than how the heap fragmented.

Times are seconds per optimizer step (forward, per-example loss, backward, ``optimizer.step()``,
``zero_grad``; synchronised on CUDA), taken afterwards in the calling process (:class:`Session`), wall
clock and process CPU time. On a shared CPU the noise is large, so steps are taken in rounds with the
engines interleaved (order rotated each round), the minimum (least disturbed) and the median are both
kept, and every ratio divides figures of the same run: a row's ratio is taken against the
``non-private`` row of the same case and the same ``run`` id only.

The largest batch that fits a memory budget is a doubling-then-bisection search over batch sizes, one
fresh process per try; on CUDA the budget is enforced with ``torch.cuda.set_per_process_memory_fraction``.

Command line (``ghostdp bench``, or ``python -m ghostdp.integrations.bench``)::

    ghostdp bench --model smollm2-135m --lora --seq-len 128 512 --batch-size 8 --device cuda
    ghostdp bench --model meta-llama/Llama-3.2-1B --engines non-private ghostdp-auto-triton opacus-ghost
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------- names

CLIPPINGS = ("auto", "ghost", "per_sample")
IMPLS = ("torch", "triton")
OPACUS_MODES = ("hooks", "ghost")
NON_PRIVATE = "non-private"
MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0
LR = 1e-5
CHILD_TIMEOUT_S = 3600

#: Goals of issue 6, as ratios ghostdp / non-private of the same run (and against Opacus).
GOALS = {
    "lora": {"memory_ratio": 1.05, "time_ratio": 1.15},
    "full": {"memory_ratio": 1.15, "time_ratio": 1.30, "opacus_hooks_memory_factor": 3.0},
}


@dataclass(frozen=True)
class EngineSpec:
    """A parsed engine name: ``family`` plus ghostdp's ``clipping`` / ``impl`` or Opacus' ``opacus_mode``."""

    name: str
    family: Literal["non-private", "ghostdp", "opacus"]
    clipping: str | None = None
    impl: str | None = None
    opacus_mode: str | None = None


def engine_names() -> list[str]:
    """Every engine name :func:`parse_engine` accepts."""
    ghost = [f"ghostdp-{c}-{i}" for c in CLIPPINGS for i in IMPLS]
    return [NON_PRIVATE, *ghost, *(f"opacus-{m}" for m in OPACUS_MODES)]


def parse_engine(name: str) -> EngineSpec:
    if name == NON_PRIVATE:
        return EngineSpec(name, "non-private")
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == "ghostdp" and parts[1] in CLIPPINGS and parts[2] in IMPLS:
        return EngineSpec(name, "ghostdp", clipping=parts[1], impl=parts[2])
    if len(parts) == 2 and parts[0] == "opacus" and parts[1] in OPACUS_MODES:
        return EngineSpec(name, "opacus", opacus_mode=parts[1])
    raise ValueError(f"unknown engine {name!r}; choose from: {', '.join(engine_names())}")


def default_engines(device: str) -> list[str]:
    """Non-private, ghostdp's three clipping modes (Triton kernels and twins on CUDA, twins on CPU), Opacus."""
    impls = ("triton", "torch") if device.startswith("cuda") else ("torch",)
    ghost = [f"ghostdp-{c}-{i}" for i in impls for c in CLIPPINGS]
    return [NON_PRIVATE, *ghost, "opacus-hooks", "opacus-ghost"]


# ----------------------------------------------------------------------------------------------- models

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
    own copy of a tied embedding matrix, for every engine of the case.
    """

    model: str
    lora: bool
    seq_len: int
    batch_size: int
    device: str = "cpu"
    dtype: str = "float32"
    untie_embeddings: bool = False
    lora_rank: int = 16

    def __post_init__(self):
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
        return "lora" if self.lora else "full"

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
    if case.lora:
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=case.lora_rank, lora_alpha=2 * case.lora_rank,
                                                 lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    return model


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


class _PerExampleLMCriterion:
    """The per-example LM loss with the ``reduction`` switch Opacus' loss wrapper flips to ``"none"``."""

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction

    def __call__(self, logits, labels):
        from ghostdp.engine.loss import per_example_lm_loss

        losses = per_example_lm_loss(logits, labels)  # (B,)
        if self.reduction == "none":
            return losses
        return losses.mean() if self.reduction == "mean" else losses.sum()


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
        model, optimizer, loss_of = _attach_opacus(model, optimizer, ids, spec.opacus_mode, case, seed)

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


def _attach_opacus(model, optimizer, ids, mode: str, case: Case, seed: int):
    """Opacus' own entry point, ``PrivacyEngine.make_private``, on the model already on its device
    (hooks must see the final parameters: Opacus #820). The data loader only sets the expected batch
    size (one batch of ``batch_size``); the step feeds the same fixed batch as the other engines."""
    import opacus
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(ids.cpu()), batch_size=case.batch_size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        out = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM, loss_reduction="mean", poisson_sampling=False,
            grad_sample_mode=mode, criterion=_PerExampleLMCriterion(),
            noise_generator=torch.Generator(device=case.device).manual_seed(seed))
    if mode == "ghost":
        module, dp_optimizer, criterion, _ = out
        labels = ids
        return module, dp_optimizer, (lambda logits: criterion(logits, labels))
    module, dp_optimizer, _ = out
    return module, dp_optimizer, None


# ----------------------------------------------------------------------------------------------- measuring

def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _warm_up_libraries() -> None:
    """Run a throwaway miniature training step (linear, embedding, attention, cross-entropy, AdamW), so
    that the buffers torch's CPU kernels allocate on first use are in the baseline, not in a figure."""
    import torch
    import torch.nn.functional as F

    emb, lin = torch.nn.Embedding(64, 32), torch.nn.Linear(32, 64)
    opt = torch.optim.AdamW([*emb.parameters(), *lin.parameters()])
    ids = torch.randint(0, 64, (2, 8))
    h = emb(ids).view(2, 8, 2, 16).transpose(1, 2)  # (B, heads, T, d)
    h = F.scaled_dot_product_attention(h, h, h, is_causal=True).transpose(1, 2).reshape(2, 8, 32)
    F.cross_entropy(lin(h).flatten(0, 1), ids.flatten()).backward()
    opt.step()


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0), so the peak covers the steps only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _import_libraries() -> None:
    """Every child imports the same libraries before its baseline RSS is read, whichever engine it runs."""
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers

    import ghostdp.engine.privacy_engine  # noqa: F401

    try:
        import opacus  # noqa: F401
    except ImportError:
        pass
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "can't allocate memory" in text or "not enough memory" in text


def _failure_status(exc: BaseException) -> str:
    """"oom", "unsupported: ..." (the engine refuses the model) or "error: ..." (a bug somewhere)."""
    from ghostdp.engine.errors import UnsupportedModuleError

    first = (str(exc).strip().splitlines() or [""])[0][:300]
    if _is_oom(exc):
        return "oom"
    if isinstance(exc, NotImplementedError | UnsupportedModuleError):
        return f"unsupported: {type(exc).__name__}: {first}"
    return f"error: {type(exc).__name__}: {first}"


def measure(case: Case, engine: str, *, steps: int, warmup: int, weights_dir: str | None = None,
            memory_budget: int | None = None, isolated: bool = False, seed: int = 0) -> dict:
    """Set up ``case`` with ``engine`` in this process and run ``warmup + steps`` steps.

    Returns a record: status, the timed step durations, the peak memory over all steps (see the module
    docstring for its definition) and the number of trainable elements. Memory is only meaningful in a
    fresh process (``isolated=True``, which :func:`measure_in_subprocess` sets); in-process records say so.
    """
    import torch

    cuda = case.device.startswith("cuda")
    if isolated and not cuda:
        _warm_up_libraries()
    record: dict[str, Any] = {"case": case.id, "engine": engine, "isolated": isolated, "step_times": [],
                              "cpu_times": [], "peak_bytes": None, "setup_bytes": None, "trainable": None}
    base_rss = _proc_status_bytes("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if memory_budget is not None:
            total = torch.cuda.get_device_properties(torch.device(case.device)).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, memory_budget / total), torch.device(case.device))
    workload = None
    try:
        workload = setup(case, engine, weights_dir=weights_dir, seed=seed)
        record["trainable"] = workload.trainable
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            record["setup_bytes"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            record["memory_kind"] = "cuda max_memory_allocated"
        else:
            rss = _proc_status_bytes("VmRSS")
            record["setup_bytes"] = None if rss is None or base_rss is None else rss - base_rss
            threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
            record["memory_kind"] = ("peak RSS above baseline" + ("" if _reset_peak_rss() else " (process lifetime)")
                                     + (f", MALLOC_MMAP_THRESHOLD_={threshold}" if threshold else ""))
        for i in range(warmup + steps):
            t0, c0 = time.perf_counter(), time.process_time()
            workload.step()
            if i >= warmup:
                record["step_times"].append(time.perf_counter() - t0)
                record["cpu_times"].append(time.process_time() - c0)
        if cuda:
            record["peak_bytes"] = torch.cuda.max_memory_allocated()
        elif isolated:
            hwm = _proc_status_bytes("VmHWM")
            record["peak_bytes"] = None if hwm is None or base_rss is None else hwm - base_rss
        else:  # RSS in a process that ran other engines before says nothing about this one
            record["setup_bytes"], record["memory_kind"] = None, "not measured (in-process on CPU)"
        record["status"] = "ok"
        if memory_budget is not None and record["peak_bytes"] is not None and record["peak_bytes"] > memory_budget:
            record["status"] = "oom"
    except Exception as exc:  # noqa: BLE001 - any failure becomes a row of the table, never a crash
        record["status"] = _failure_status(exc)
        if record["status"].startswith("error"):
            log.warning("%s on %s failed", engine, case.id, exc_info=True)
        else:
            log.info("%s on %s: %s", engine, case.id, record["status"])
    finally:
        del workload
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return record


def measure_in_subprocess(case: Case, engine: str, *, steps: int, warmup: int, weights_dir: str | None = None,
                          memory_budget: int | None = None, seed: int = 0, threads: int | None = None,
                          timeout: float = CHILD_TIMEOUT_S) -> dict:
    """:func:`measure` in a fresh process, so its peak memory is its own.

    The process is forked from a server that imported the libraries once (:class:`_ForkServer`): a fresh
    address space per measurement without paying ~10 s of imports each time. Where ``os.fork`` does not
    exist, a new interpreter is started instead.
    """
    with tempfile.TemporaryDirectory(prefix="ghostdp-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        payload = {"case": dataclasses.asdict(case), "engine": engine, "steps": steps, "warmup": warmup,
                   "weights_dir": weights_dir, "memory_budget": memory_budget, "seed": seed,
                   "threads": threads, "result_path": str(result_path)}
        if hasattr(os, "fork"):
            code = _fork_server().run(payload, timeout)
        else:  # pragma: no cover - no fork (Windows)
            cmd = [sys.executable, "-c", "from ghostdp.integrations.bench import _child_main; _child_main()",
                   json.dumps(payload)]
            try:
                code = subprocess.run(cmd, env=_child_env(), timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = None
        if result_path.exists():
            return json.loads(result_path.read_text())
    log.warning("bench child for %s on %s ended with exit code %s (its stderr is above)", engine, case.id, code)
    if code is None:
        return _failed_record(case, engine, f"error: timed out after {timeout:.0f} s")
    if code == -signal.SIGKILL:
        return _failed_record(case, engine, "oom: child killed (SIGKILL), host memory likely exhausted")
    return _failed_record(case, engine, f"error: child exited with code {code}")


def _failed_record(case: Case, engine: str, status: str) -> dict:
    return {"case": case.id, "engine": engine, "isolated": True, "step_times": [], "cpu_times": [],
            "peak_bytes": None, "setup_bytes": None, "trainable": None, "status": status}


def _child_env() -> dict:
    """Environment of measured processes. glibc keeps freed blocks below its (self-raising, up to 32 MiB)
    mmap threshold in its heap, so RSS would record how the allocator happened to fragment rather than
    what was alive; a fixed 64 KiB threshold hands every tensor-sized block back to the OS on free."""
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    return env


def _run_payload(payload: dict) -> None:
    """In the fresh process: one :func:`measure`, its record written to ``payload["result_path"]``."""
    if payload.get("threads"):
        import torch

        torch.set_num_threads(payload["threads"])
    record = measure(Case(**payload["case"]), payload["engine"], steps=payload["steps"],
                     warmup=payload["warmup"], weights_dir=payload["weights_dir"],
                     memory_budget=payload["memory_budget"], isolated=True, seed=payload["seed"])
    Path(payload["result_path"]).write_text(json.dumps(record))


def _child_main() -> None:  # pragma: no cover - the no-fork fallback
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _import_libraries()
    _run_payload(json.loads(sys.argv[1]))


class _ForkServer:
    """A Python process that imports torch, transformers, peft, opacus and ghostdp once, then forks one
    child per measurement (payload as a JSON line on its stdin; it answers the child's pid, then its exit
    code). The server itself never runs a torch op or touches CUDA, so forking it is safe, and every child
    starts from the same baseline."""

    def __init__(self):
        code = "from ghostdp.integrations.bench import _fork_server_main; _fork_server_main()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_child_env())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self, timeout: float | None) -> dict | None:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        return json.loads(line) if line else None

    def run(self, payload: dict, timeout: float) -> int | None:
        """Exit code of the child (negative: killed by that signal), or None if it timed out."""
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        started = self._read(None)
        if started is None:
            raise RuntimeError("the benchmark fork server died; see its stderr above")
        done = self._read(timeout)
        if done is None:
            os.kill(started["pid"], signal.SIGKILL)
            self._read(None)
            return None
        return done["exit"]

    def close(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_SERVER: _ForkServer | None = None


def _fork_server() -> _ForkServer:
    global _SERVER
    if _SERVER is None or not _SERVER.alive():
        import atexit

        _SERVER = _ForkServer()
        atexit.register(_SERVER.close)
    return _SERVER


def _fork_server_main() -> None:
    """The server loop (see :class:`_ForkServer`). Children send their stdout to stderr: stdout is the
    protocol channel."""
    import traceback

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _import_libraries()
    channel = sys.stdout
    for line in sys.stdin:
        payload = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.dup2(2, 1)
                _run_payload(payload)
                code = 0
            except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        channel.write(json.dumps({"pid": pid}) + "\n")
        channel.flush()
        _, status = os.waitpid(pid, 0)
        channel.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        channel.flush()


# ----------------------------------------------------------------------------------------------- largest batch

def search_max(fits: Callable[[int], bool], *, start: int = 1, limit: int = 4096) -> int | None:
    """Largest ``b`` in [start, limit] with ``fits(b)``, assuming fits is monotone (True then False).

    Doubling from ``start`` until the first failure, then bisection between the last success and it:
    about 2·log2(answer) calls. None when ``start`` itself does not fit.
    """
    if not fits(start):
        return None
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, limit)
        if nxt == lo:
            return lo
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_batch_size(case: Case, engine: str, budget_bytes: int, *, weights_dir: str | None = None,
                   limit: int = 4096) -> int | None:
    """Largest batch size of ``case`` whose step peak memory stays within ``budget_bytes`` (fresh process
    per try; one warm-up and one timed step, so the optimizer state is allocated)."""

    def fits(b: int) -> bool:
        rec = measure_in_subprocess(dataclasses.replace(case, batch_size=b), engine, steps=1, warmup=1,
                                    weights_dir=weights_dir, memory_budget=budget_bytes)
        ok = rec["status"] == "ok"
        log.info("max batch %s %s B=%d: %s", case.id, engine, b, rec["status"])
        if not ok and rec["status"] != "oom":
            raise RuntimeError(f"{engine} on {case.id} at batch size {b}: {rec['status']}")
        return ok

    try:
        return search_max(fits, limit=limit)
    except RuntimeError as exc:
        log.warning("largest-batch search stopped: %s", exc)
        return None


# ----------------------------------------------------------------------------------------------- results

def _git_commit() -> str | None:
    import ghostdp

    root = Path(ghostdp.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "ghostdp", "bench"],
                               cwd=root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+uncommitted-changes" if dirty.strip() else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Device name, library versions, commit, date and CPU load: what a figure needs to be read."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = f"CPU: {_cpu_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    env = {
        "device": name,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "peft", "opacus", "triton", "ghostdp")},
    }
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    return env


def summarize(run: str, case: Case, engine: str, records: Sequence[dict], *, timing: str,
              times: Sequence[float] | None = None, cpu_times: Sequence[float] | None = None) -> dict:
    """One table row from the records of one (case, engine): min / median wall and CPU time per step
    over every timed step (``times`` / ``cpu_times`` override the records' own), median peak memory.

    CPU time (``time.process_time``) is kept beside wall time because on a shared CPU a process that
    is descheduled loses wall time but not CPU time: with one torch thread it is the steadier figure.
    """
    status = next((r["status"] for r in records if r["status"] != "ok"), "ok") if records else "not run"
    all_times = list(times) if times is not None else [t for r in records for t in r["step_times"]]
    all_cpu = list(cpu_times) if cpu_times is not None else [t for r in records for t in r.get("cpu_times", [])]
    if case.device.startswith("cuda"):
        all_cpu = []  # host CPU time says nothing about GPU work
    peaks = [r["peak_bytes"] for r in records if r.get("peak_bytes") is not None and r["status"] == "ok"]
    trainable = next((r["trainable"] for r in records if r.get("trainable")), None)
    row = {
        "run": run, "case": case.id, "model": case.model, "mode": case.mode, "untied": case.untie_embeddings,
        "seq_len": case.seq_len, "batch_size": case.batch_size, "device": case.device, "dtype": case.dtype,
        "engine": engine, "status": status, "trainable": trainable, "timing": timing,
        "n_steps": len(all_times),
        "step_min_s": min(all_times) if all_times else None,
        "step_median_s": statistics.median(all_times) if all_times else None,
        "cpu_min_s": min(all_cpu) if all_cpu else None,
        "cpu_median_s": statistics.median(all_cpu) if all_cpu else None,
        "peak_bytes": int(statistics.median(peaks)) if peaks else None,
        "memory_kind": next((r.get("memory_kind") for r in records if r.get("memory_kind")), None),
        "isolated_step_s": [round(t, 6) for r in records if r.get("isolated") for t in r["step_times"]],
        "isolated_cpu_s": [round(t, 6) for r in records if r.get("isolated") for t in r.get("cpu_times", [])],
        "max_batch": None, "max_batch_budget_bytes": None,
    }
    if status == "ok" and not all_times:
        row["status"] = "ok (memory only)"
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """Ratios to the ``non-private`` row of the same case *and the same run*; None where there is none."""
    base = {(r["run"], r["case"]): r for r in rows if r["engine"] == NON_PRIVATE}

    def ratio(a, b):
        return a / b if a is not None and b else None

    for r in rows:
        b = base.get((r["run"], r["case"]))
        r["time_ratio_min"] = ratio(r["step_min_s"], b["step_min_s"]) if b else None
        r["time_ratio_median"] = ratio(r["step_median_s"], b["step_median_s"]) if b else None
        r["cpu_ratio_min"] = ratio(r.get("cpu_min_s"), b.get("cpu_min_s")) if b else None
        r["cpu_ratio_median"] = ratio(r.get("cpu_median_s"), b.get("cpu_median_s")) if b else None
        r["memory_ratio"] = ratio(r["peak_bytes"], b["peak_bytes"]) if b else None
    return rows


def goal_engine(rows: Iterable[dict], case: str) -> dict | None:
    """The ghostdp row a goal is judged on: clipping=auto, the Triton kernels when they ran, else the twins."""
    by = {r["engine"]: r for r in rows if r["case"] == case}
    for name in ("ghostdp-auto-triton", "ghostdp-auto-torch"):
        if name in by and by[name]["status"] == "ok":
            return by[name]
    return None


def goals(rows: list[dict]) -> list[dict]:
    """Issue 6's goals per case, met or missed, from the rows' same-run ratios."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        g = goal_engine(rows, case)
        if g is None:
            continue
        limits = GOALS[g["mode"]]
        by = {r["engine"]: r for r in rows if r["case"] == case and r["run"] == g["run"]}

        def check(goal: str, measured: float | None, ok: Callable[[float], bool]) -> None:
            out.append({"case": case, "engine": g["engine"], "goal": goal, "measured": measured,
                        "met": None if measured is None else bool(ok(measured))})

        check(f"memory / non-private <= {limits['memory_ratio']}", g["memory_ratio"],
              lambda m: m <= limits["memory_ratio"])
        # On a CPU shared with other processes, CPU time is the steadier figure; wall time on CUDA.
        cpu = g.get("cpu_ratio_min") is not None
        check(f"{'CPU' if cpu else 'wall'} time / non-private (min) <= {limits['time_ratio']}",
              g["cpu_ratio_min"] if cpu else g["time_ratio_min"], lambda m: m <= limits["time_ratio"])
        if g["mode"] == "full":
            hooks = by.get("opacus-hooks")
            factor = (hooks["peak_bytes"] / g["peak_bytes"]
                      if hooks and hooks["peak_bytes"] and g["peak_bytes"] else None)
            need = limits["opacus_hooks_memory_factor"]
            check(f"opacus-hooks memory / ghostdp memory >= {need}", factor, lambda m: m >= need)
            og = by.get("opacus-ghost")
            key = "cpu_min_s" if cpu else "step_min_s"
            rel = g[key] / og[key] if og and og.get(key) and g.get(key) else None
            check(f"ghostdp {'CPU' if cpu else 'wall'} time / opacus-ghost (min) < 1", rel, lambda m: m < 1)
    return out


def new_result(run: str, env: dict, settings: dict, rows: list[dict]) -> dict:
    return {"runs": {run: {**env, "settings": settings}}, "rows": add_ratios(rows)}


def merge_results(old: dict | None, new: dict) -> dict:
    """Rows of ``new`` replace the rows of ``old`` for the same (case, engine), except that an old
    ``non-private`` row stays while an old row of its run and case does: it is their ratios' base.
    Runs no row refers to are dropped; the table names the run of every row."""
    if not old:
        return new
    keys = {(r["case"], r["engine"]) for r in new["rows"]}
    kept = [r for r in old.get("rows", []) if (r["case"], r["engine"]) not in keys]
    based = {(r["run"], r["case"]) for r in kept if r["engine"] != NON_PRIVATE}
    bases = [r for r in old.get("rows", []) if r["engine"] == NON_PRIVATE and (r["case"], r["engine"]) in keys
             and (r["run"], r["case"]) in based]
    rows = kept + bases + new["rows"]
    order = {case: i for i, case in enumerate(dict.fromkeys(r["case"] for r in rows))}
    runs = {**old.get("runs", {}), **new["runs"]}
    run_order = {run: i for i, run in enumerate(runs)}
    rows.sort(key=lambda r: (order[r["case"]], run_order.get(r["run"], -1), r["engine"] != NON_PRIVATE))
    used = {r["run"] for r in rows}
    return {"runs": {k: v for k, v in runs.items() if k in used}, "rows": rows}


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(result: dict, *, title: str = "ghostdp vs non-private vs Opacus") -> str:
    """The result as Markdown: each run's environment, one table, the goals."""
    lines = [f"# {title}", ""]
    label = {run: f"r{i + 1}" for i, run in enumerate(result["runs"])}
    for run, env in result["runs"].items():
        s = env.get("settings", {})
        lines.append(
            f"- {label[run]} = run `{run}`: {env['device']}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
            f"peft {env.get('peft')}, opacus {env.get('opacus')}, triton {env.get('triton')}; commit "
            f"{env.get('commit')}; {env.get('date')}; load average at start {env.get('load_average_start')}"
            + (f", at end {env.get('load_average_end')}" if env.get("load_average_end") else "")
            + (f"; timing: {s.get('timing')}" if s.get("timing") else "")
            + (f"; {s.get('rounds')} rounds x {s.get('steps')} steps after {s.get('warmup')} warm-up"
               if s.get("rounds") is not None else "")
            + (f"; {s['threads']} torch thread(s) in measured processes" if s.get("threads") else "")
        )
    lines += [
        "",
        "Step: forward, per-example loss, backward, optimizer step (AdamW), zero_grad; C = 1, sigma = 1. "
        "`x np`: ratio to the non-private row of the same case and run, of the minima (least disturbed "
        "by other processes) / of the medians. CPU s: process CPU time per step (CPU runs only; steadier "
        "than wall time on a shared machine, and the figure CPU goals are judged on). Peak memory: CUDA "
        "max_memory_allocated; CPU: peak RSS of a fresh process during the steps minus its RSS after "
        "imports and a throwaway miniature step (glibc mmap threshold fixed at 64 KiB, so freed tensors "
        "leave RSS). Both include weights and optimizer state.",
        *(["", "CPU runs: on a machine other jobs share, the step times of one run move by 10-30% between "
               "steps; read ratios within a run, and trust rows with more timed steps (n) more. The PyTorch "
               "twins run there, never the Triton kernels."]
          if any(env.get("device", "").startswith("CPU") for env in result["runs"].values()) else []),
        "",
        "| case | engine | run | trainable | wall s min / median | x np | CPU s min / median | x np | n "
        "| peak memory | memory x np | max batch | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mb = "-" if r.get("max_batch_budget_bytes") is None else (
            f"{r['max_batch'] if r['max_batch'] is not None else 'none'} @ {_fmt_bytes(r['max_batch_budget_bytes'])}")
        lines.append(
            f"| {r['case']} | {r['engine']} | {label.get(r['run'], r['run'])} | {_fmt(r['trainable'], ',')} "
            f"| {_fmt(r['step_min_s'], '.3f')} / {_fmt(r['step_median_s'], '.3f')} "
            f"| {_fmt(r['time_ratio_min'], '.2f')} / {_fmt(r['time_ratio_median'], '.2f')} "
            f"| {_fmt(r.get('cpu_min_s'), '.3f')} / {_fmt(r.get('cpu_median_s'), '.3f')} "
            f"| {_fmt(r.get('cpu_ratio_min'), '.2f')} / {_fmt(r.get('cpu_ratio_median'), '.2f')} | {r['n_steps']} "
            f"| {_fmt_bytes(r['peak_bytes'])} | {_fmt(r['memory_ratio'], '.3f')} | {mb} | {r['status']} |")
    checks = goals(result["rows"])
    if checks:
        lines += ["", "## Goals", "", "| case | engine | goal | measured | met |", "|---|---|---|---|---|"]
        for c in checks:
            met = "n/a" if c["met"] is None else ("yes" if c["met"] else "**no**")
            lines.append(f"| {c['case']} | {c['engine']} | {c['goal']} | {_fmt(c['measured'], '.3f')} | {met} |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, stem: str | Path, *, merge: bool = False, title: str | None = None) -> dict:
    """Write ``<stem>.json`` and ``<stem>.md``; with ``merge``, keep the other cases already in the JSON."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    if merge and json_path.exists():
        result = merge_results(json.loads(json_path.read_text()), result)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result, **({"title": title} if title else {})))
    log.info("wrote %s.{json,md}", stem)
    return result


# ----------------------------------------------------------------------------------------------- comparison

def rotated(items: Sequence[str], k: int) -> list[str]:
    """``items`` rotated left by k: round k of an interleaved run starts with a different engine."""
    k %= max(1, len(items))
    return list(items[k:]) + list(items[:k])


def _free_bytes(device: str) -> int:
    """Memory this process could still use: free CUDA memory, or MemAvailable on the host."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Session:
    """Memory in fresh processes, then time in this one, engines interleaved: the procedure behind both
    ``ghostdp bench`` (:func:`compare`) and the pytest-benchmark suite in ``bench/``.

    Why two places: a process's peak memory is only its own in a fresh process, and the CPU figure needs
    glibc's fixed mmap threshold (see :func:`_child_env`), which costs page faults and so slows the
    steps unevenly; times are therefore taken here, where steps of different engines can alternate
    within seconds of each other (on a shared CPU the load changes faster than a process starts).

    - :meth:`memory` runs every engine of a case once in a fresh process (``memory_steps`` steps, so
      AdamW's state exists), before this process builds anything for that case; with
      ``max_batch_budget`` it also searches the largest batch within that budget (for the cases
      ``max_batch_when`` accepts).
    - :meth:`workload` builds (and warms up) a case's workload here. All the case's workloads stay alive
      when the peaks measured in :meth:`memory` fit in ``co_resident_fraction`` of the free memory;
      otherwise only one does, and each round rebuilds (and warms up) its own.
    - :meth:`record` collects the wall and CPU time of timed steps; :meth:`rows` summarises.
    """

    def __init__(self, engines: Sequence[str], *, threads: int | None = None, memory_steps: int = 2,
                 warmup: int = 1, isolate: bool = True, max_batch_budget: int | None = None,
                 max_batch_when: Callable[[Case], bool] | None = None, co_resident_fraction: float = 0.6,
                 weights_root: str | Path | None = None):
        for e in engines:
            parse_engine(e)
        self.engines = list(engines)
        self.threads, self.memory_steps, self.warmup = threads, memory_steps, warmup
        self.isolate, self.max_batch_budget = isolate, max_batch_budget
        self.max_batch_when = max_batch_when or (lambda case: True)
        self.co_resident_fraction = co_resident_fraction
        self._own_tmp = weights_root is None
        self.weights_root = Path(weights_root or tempfile.mkdtemp(prefix="ghostdp-bench-weights-"))
        self.weights: dict[str, str | None] = {}
        self.records: dict[Case, dict[str, dict]] = {}
        self.max_batch: dict[tuple[Case, str], int | None] = {}
        self.co_resident: dict[Case, bool] = {}
        self.workloads: dict[tuple[Case, str], Workload] = {}
        self.times: dict[tuple[Case, str], list[float]] = {}
        self.cpu_times: dict[tuple[Case, str], list[float]] = {}
        self._threads_before = None

    def __enter__(self) -> "Session":
        if self.threads:
            import torch

            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.drop_workloads()
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self._own_tmp:
            shutil.rmtree(self.weights_root, ignore_errors=True)

    def weights_dir(self, case: Case) -> str | None:
        if case.model not in self.weights:
            cached = cache_weights(case.model, self.weights_root) if needs_weight_cache(case.model) else None
            self.weights[case.model] = cached
        return self.weights[case.model]

    def drop_workloads(self, keep: Case | None = None) -> None:
        for key in [k for k in self.workloads if k[0] != keep]:
            del self.workloads[key]
        gc.collect()
        if any(c.device.startswith("cuda") for c in self.records):
            import torch

            torch.cuda.empty_cache()

    def memory(self, case: Case) -> dict[str, dict]:
        """Per engine, the record of its fresh-process run on ``case`` (once per case)."""
        if case in self.records:
            return self.records[case]
        self.drop_workloads()
        weights = self.weights_dir(case)
        records = {}
        for engine in self.engines:
            if self.isolate:
                rec = measure_in_subprocess(case, engine, steps=self.memory_steps, warmup=0,
                                            weights_dir=weights, threads=self.threads)
            else:
                rec = measure(case, engine, steps=self.memory_steps, warmup=0, weights_dir=weights)
            log.info("memory %s %s: %s, peak %s", case.id, engine, rec["status"], _fmt_bytes(rec["peak_bytes"]))
            records[engine] = rec
            if (self.max_batch_budget is not None and self.isolate and rec["status"] == "ok"
                    and self.max_batch_when(case)):
                self.max_batch[(case, engine)] = max_batch_size(case, engine, self.max_batch_budget,
                                                                weights_dir=weights)
        self.records[case] = records
        need = sum(r["peak_bytes"] or 0 for r in records.values() if r["status"] == "ok")
        self.co_resident[case] = self.isolate and need <= self.co_resident_fraction * _free_bytes(case.device)
        log.info("%s: workloads %s (%s of measured peaks)", case.id,
                 "kept alive together" if self.co_resident[case] else "built one at a time", _fmt_bytes(need))
        return records

    def workload(self, case: Case, engine: str) -> Workload:
        """The live workload of (case, engine), built and warmed up if needed."""
        key = (case, engine)
        if key not in self.workloads:
            self.memory(case)
            self.drop_workloads(keep=case if self.co_resident[case] else None)
            wl = setup(case, engine, weights_dir=self.weights_dir(case))
            for _ in range(self.warmup):
                wl.step()
            self.workloads[key] = wl
        return self.workloads[key]

    def record(self, case: Case, engine: str, wall: float, cpu: float) -> None:
        self.times.setdefault((case, engine), []).append(wall)
        self.cpu_times.setdefault((case, engine), []).append(cpu)

    def timed_step(self, case: Case, engine: str) -> None:
        """One step of (case, engine), its wall and CPU time recorded."""
        wl = self.workload(case, engine)
        t0, c0 = time.perf_counter(), time.process_time()
        wl.step()
        self.record(case, engine, time.perf_counter() - t0, time.process_time() - c0)

    def rows(self, run: str, timing: str) -> list[dict]:
        rows = []
        for case, records in self.records.items():
            for engine in self.engines:
                row = summarize(run, case, engine, [records[engine]], timing=timing,
                                times=self.times.get((case, engine), []),
                                cpu_times=self.cpu_times.get((case, engine), []))
                if (case, engine) in self.max_batch:
                    row["max_batch"] = self.max_batch[(case, engine)]
                    row["max_batch_budget_bytes"] = self.max_batch_budget
                rows.append(row)
        return rows


def compare(cases: Sequence[Case], engines: Sequence[str], *, rounds: int, steps: int, warmup: int,
            isolate: bool = True, max_batch_budget: int | None = None, run: str | None = None,
            threads: int | None = None, memory_steps: int = 2) -> dict:
    """Every engine on every case: memory in fresh processes, then ``rounds`` interleaved rounds of
    ``steps`` timed steps each (engine order rotated every round), see :class:`Session`.

    ``isolate=False`` skips the fresh processes (quick looks and tests): the memory figures are then
    not reported on CPU, and are this process's on CUDA.
    """
    run = run or datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    env = environment(cases[0].device if cases else "cpu")
    with Session(engines, threads=threads, memory_steps=memory_steps, warmup=warmup, isolate=isolate,
                 max_batch_budget=max_batch_budget) as session:
        for case in cases:
            records = session.memory(case)
            for k in range(rounds):
                for engine in rotated(session.engines, k):
                    if records[engine]["status"] != "ok":
                        continue
                    for _ in range(steps):
                        session.timed_step(case, engine)
            session.drop_workloads()
        timing = "in-process, engines interleaved by round; memory " + (
            "in fresh processes" if isolate else "not isolated")
        rows = session.rows(run, timing)
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    settings = {"rounds": rounds, "steps": steps, "warmup": warmup, "threads": threads,
                "memory_steps": memory_steps, "timing": timing}
    return new_result(run, env, settings, rows)


# ----------------------------------------------------------------------------------------------- command line

def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``ghostdp bench`` options."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="preset (" + ", ".join(PRESETS) + "), 'smollm2-135m' (embedded), a Hugging Face "
                             "hub name, a local folder or a .gguf file (default: smollm2-135m)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters on all linear layers (base frozen) instead of every parameter")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank r (default 16)")
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128],
                        help="sequence length(s) T; one case per value (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    parser.add_argument("--engines", nargs="+", default=None, metavar="ENGINE",
                        help="engines to compare (default: all that fit the device): " + ", ".join(engine_names()))
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=DTYPES,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--untie-embeddings", action="store_true",
                        help="give the LM head its own copy of tied embeddings, for every engine (Opacus' "
                             "ghost clipping refuses tied parameters)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds: each runs every engine in turn, order rotated per round "
                             "(default: 3 on CPU, 1 on CUDA)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per engine per round (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps after each workload is built (default: 1 on CPU, 2 on CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads in each measured process (default: torch's choice); on a CPU "
                             "shared with other jobs, 1 gives the steadiest CPU-time figures")
    parser.add_argument("--max-batch-budget-gib", type=float, default=None,
                        help="also search the largest batch size whose peak memory fits this budget (GiB)")
    parser.add_argument("--out", default=None,
                        help="write <OUT>.json and <OUT>.md (e.g. bench/results/mymodel)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every engine in this process (quick look; memory figures not isolated)")


def run(args: argparse.Namespace) -> int:
    """``ghostdp bench``: print the comparison table. 0 on success, 2 on bad options, 1 if an engine
    failed with an error (an engine refusing the model, or running out of memory, is a result, not a failure)."""
    device = args.device or _default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        engines = args.engines or default_engines(device)
        for e in engines:
            parse_engine(e)
        cases = [Case(args.model, args.lora, t, args.batch_size, device=device, dtype=dtype,
                      untie_embeddings=args.untie_embeddings, lora_rank=args.lora_rank) for t in args.seq_len]
        cuda = device.startswith("cuda")
        rounds = args.rounds if args.rounds is not None else (1 if cuda else 3)
        steps = args.steps if args.steps is not None else (5 if cuda else 1)
        warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
        if rounds < 1 or steps < 1 or warmup < 0:
            raise ValueError("--rounds and --steps must be >= 1 and --warmup >= 0")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    except ValueError as exc:
        sys.stderr.write(f"ghostdp bench: {exc}\n")
        return 2
    budget = None if args.max_batch_budget_gib is None else int(args.max_batch_budget_gib * 2**30)
    if NON_PRIVATE not in engines:
        log.warning("no 'non-private' engine: the ratio columns stay empty")
    result = compare(cases, engines, rounds=rounds, steps=steps, warmup=warmup,
                     isolate=not args.in_process, max_batch_budget=budget, threads=args.threads)
    if args.out:
        write_results(result, args.out)
    sys.stdout.write(markdown(result))
    return 1 if any(r["status"].startswith("error") for r in result["rows"]) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ghostdp bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

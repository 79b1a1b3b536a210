"""The engine on CUDA against the exact reference, with no host synchronisation inside backward.

For every (dtype, impl, model) in fp32 / bf16 x the PyTorch twins / the Triton kernels x full fine-tuning
(tied embeddings) / LoRA, one DP step of :class:`ghostdp.PrivacyEngine` on CUDA (noise 0) is compared with
the reference of ``tests/helpers.py``: per-example gradients one example at a time, clipped, summed, in
float64 on the CPU, from the same (rounded) weights. The clipping bound is the median per-example norm, so
some examples are clipped and some are not.

``loss.backward()`` runs under ``torch.cuda.set_sync_debug_mode("error")``: any operation that waits for
the device from the host (``.item()``, a device-to-host copy, ``nonzero``) raises, which proves the
per-layer norms, clip factors and clipped sums never stall the step.

Tolerances: bf16 as the existing GPU test (per-parameter relative error of the gradient < 0.1, norms to
5%); fp32 with the twins to 1e-4; fp32 with the Triton kernels to 1e-2, since ``tl.dot`` on fp32 inputs
rounds them to TF32 (10-bit mantissa). Every measured error is reported, met or not.

Run by ``bench/gpu_check.py`` (stage ``engine``); alone: ``PYTHONPATH=. python bench/gpu_engine_check.py``.
"""
from __future__ import annotations

import copy
import json
import logging
import statistics
import sys

import torch

from tests.helpers import lm_batch, lm_losses, reference_dp_grads

log = logging.getLogger(__name__)

#: (dtype, impl) -> (max relative gradient error per parameter, relative tolerance of the norms)
TOLERANCES = {
    ("float32", "torch"): (1e-4, 1e-4),
    ("float32", "triton"): (1e-2, 1e-2),
    ("bfloat16", "torch"): (0.1, 5e-2),
    ("bfloat16", "triton"): (0.1, 5e-2),
}
LENGTHS = [17, 9, 31, 24]  # right-padded, odd lengths


def small_llama(*, lora: bool, seed: int = 0):
    """A 2-layer Llama (tied embeddings, eager attention) in float64, with LoRA r=8 on all linear layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float64)
    with torch.no_grad():  # non-trivial norm weights, so their per-example gradients are generic
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 1)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 lora_dropout=0.0, init_lora_weights=False))
    return model


def check_one(dtype: str, impl: str, lora: bool, *, device: str = "cuda") -> dict:
    """One engine step on ``device`` vs the float64 reference; a record of the errors and of the sync check
    (CUDA only; ``device="cpu"`` exists to try this code without a GPU)."""
    from ghostdp import PrivacyEngine

    torch_dtype = getattr(torch, dtype)
    model = small_llama(lora=lora).to(device, torch_dtype)
    reference_model = copy.deepcopy(model).to("cpu", torch.float64)  # the same rounded weights, exact arithmetic
    batch = lm_batch(LENGTHS, vocab=128, seed=3)
    expected = float(len(LENGTHS))
    _, free_norms = reference_dp_grads(reference_model, [batch], lm_losses, float("inf"), expected)
    C = statistics.median(free_norms)
    ref, ref_norms = reference_dp_grads(reference_model, [batch], lm_losses, C, expected)

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=expected, noise_multiplier=0.0,
                           impl=impl)
    loss = lm_losses(model, {k: v.to(device) for k, v in batch.items()}).mean()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    sync_error = None
    try:
        loss.backward()
    except RuntimeError as exc:  # a host synchronisation inside backward
        if not cuda:
            raise
        sync_error = str(exc).splitlines()[0][:300]
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    record = {"dtype": dtype, "impl": impl, "model": "lora" if lora else "full-tied", "C": C,
              "clipped": sum(n > C for n in ref_norms), "of": len(ref_norms), "sync_error": sync_error}
    if sync_error is None:
        opt.step()
        norms = engine.per_sample_norms.double().cpu()
        want = torch.tensor(ref_norms, dtype=torch.float64)
        record["norm_max_rel_err"] = float(((norms - want).abs() / want).max())
        errors = {}
        for name, p in model.named_parameters():
            if name in ref:
                errors[name] = float((p.grad.double().cpu() - ref[name]).norm() / ref[name].norm().clamp(min=1e-12))
        worst = max(errors, key=errors.get)
        record.update(grad_max_rel_err=errors[worst], worst_param=worst, params=len(errors))
    grad_tol, norm_tol = TOLERANCES[(dtype, impl)]
    record["tolerance"] = {"grad": grad_tol, "norm": norm_tol}
    record["passed"] = (sync_error is None and record["norm_max_rel_err"] <= norm_tol
                        and record["grad_max_rel_err"] <= grad_tol)
    return record


def run_checks(dtypes=("float32", "bfloat16"), impls=("torch", "triton")) -> list[dict]:
    records = []
    for dtype in dtypes:
        for impl in impls:
            for lora in (False, True):
                try:
                    rec = check_one(dtype, impl, lora)
                except Exception as exc:  # noqa: BLE001 - every combination gets a row
                    log.warning("engine check %s %s %s failed", dtype, impl, lora, exc_info=True)
                    rec = {"dtype": dtype, "impl": impl, "model": "lora" if lora else "full-tied", "passed": False,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
                log.info("engine check: %s", rec)
                records.append(rec)
    return records


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not torch.cuda.is_available():
        log.error("needs CUDA")
        sys.exit(2)
    out = run_checks()
    sys.stdout.write(json.dumps(out, indent=1) + "\n")
    sys.exit(0 if all(r["passed"] for r in out) else 1)

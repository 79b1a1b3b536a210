"""QLoRA: PEFT LoRA adapters over a frozen NF4 (bitsandbytes 4-bit) base, against the one-example reference.

The base's ``Linear4bit`` layers are frozen (their packed uint8 weight cannot even require grad) and need no
per-example gradient; only the gradient with respect to their input flows through them, computed by
bitsandbytes from the dequantized weight in both the engine's run and the reference's. ``lora_A`` and
``lora_B`` are ``nn.Linear`` and clipped by the linear rule. The model computes in float32 (bitsandbytes'
compute dtype), so the comparison holds to float32 precision, not float64's.

The tiny Llama here has widths that are multiples of 64: NF4 quantizes in blocks of 64, and bitsandbytes'
CPU inference path repacks weights in blocks of 32 output features.
"""
from __future__ import annotations

import copy
import statistics

import pytest
import torch

from ghostdp import PrivacyEngine, UnsupportedModuleError
from tests.helpers import lm_batch, lm_losses, reference_dp_grads, word_tokenizer_from

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes >= 0.46 (pip install bitsandbytes)")

VOCAB = 64
BATCHES = [[5, 9, 3, 7], [6, 4]]  # right-padded lengths of two physical batches, one DP step


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny float32 Llama (tied embeddings) saved to disk, for from_pretrained with a 4-bit config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    word_tokenizer_from([f"w{i}" for i in range(40)], pad=True).save_pretrained(path)  # for load_causal_lm
    return path


def qlora_model(base_dir, targets=("q_proj", "v_proj", "o_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ghostdp.integrations.hf.models import quantization_config

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32,
                                                 quantization_config=quantization_config("4bit", torch.float32))
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0,
                                             init_lora_weights=False))
    model.train()
    return model


def batches():
    return [lm_batch(BATCHES[0], vocab=VOCAB, seed=1), lm_batch(BATCHES[1], vocab=VOCAB, seed=2)]


def test_base_is_4bit_and_only_lora_trains(base_dir):
    model = qlora_model(base_dir)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every projection of both blocks
    assert all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in quantized)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("clipping", ["auto", "ghost", "per_sample"])
def test_qlora_norms_and_clipped_sum_match_reference(base_dir, clipping):
    model = qlora_model(base_dir)
    data = batches()
    all_norms = []
    for b in data:
        all_norms += reference_dp_grads(model, [b], lm_losses, float("inf"), 1.0)[1]
    C = statistics.median(all_norms)  # some examples clip, some do not
    expected = 6.5
    ref, ref_norms = reference_dp_grads(model, data, lm_losses, C, expected)

    model = copy.deepcopy(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = PrivacyEngine(model, opt, max_grad_norm=C, expected_batch_size=expected, noise_multiplier=0.0,
                           clipping=clipping, loss_reduction="sum")
    for b in data:
        lm_losses(model, b).sum().backward()
    norms_last = engine.per_sample_norms.clone()
    opt.step()

    assert sum(n > C for n in all_norms) >= 1 and sum(n < C for n in all_norms) >= 1
    torch.testing.assert_close(norms_last.double(), torch.tensor(ref_norms, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == set(ref) and len(ref) == 2 * 2 * 4  # A and B of 4 targets in 2 blocks
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(float(g.abs().sum()) > 0 for g in got.values())
    assert all(n > 0 for n in ref_norms)  # every example of the last batch has target tokens


def test_a_trainable_parameter_of_a_quantized_layer_is_refused(base_dir):
    """The packed 4-bit weight cannot require grad; its bias (a float tensor) can, and must then be refused."""
    model = qlora_model(base_dir)
    layer = model.base_model.model.model.layers[0].mlp.up_proj  # a Linear4bit that LoRA does not target
    assert isinstance(layer, bnb.nn.Linear4bit)
    with pytest.raises(RuntimeError, match="floating point"):
        layer.weight.requires_grad_(True)
    layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with pytest.raises(UnsupportedModuleError, match="up_proj.bias.*Linear4bit"):
        PrivacyEngine(model, opt, max_grad_norm=1.0, expected_batch_size=4, noise_multiplier=0.0)


def test_load_causal_lm_and_the_app_option_give_a_4bit_base_under_lora(base_dir):
    """``load_causal_lm(quantization="4bit")`` and the synthetic-text app's ``train.quantization``."""
    from ghostdp.integrations.hf.models import load_causal_lm
    from ghostdp.integrations.synthetic.config import ConfigError, TrainConfig
    from ghostdp.integrations.synthetic.pipeline import _build_model

    model, tokenizer = load_causal_lm(str(base_dir), quantization="4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    assert tokenizer.pad_token is not None
    with pytest.raises(ValueError, match="quantization='8bit'"):
        load_causal_lm(str(base_dir), quantization="8bit")

    with pytest.raises(ConfigError, match="needs method='lora'"):
        TrainConfig(model=str(base_dir), quantization="4bit", method="full")
    model, _ = _build_model(TrainConfig(model=str(base_dir), quantization="4bit", lora_targets=("q_proj", "v_proj")))
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 7
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ConfigError, match="is quantized"):  # a quantized base without asking for QLoRA
        from unittest import mock

        with mock.patch("ghostdp.integrations.hf.models.load_causal_lm", return_value=(model, None)):
            _build_model(TrainConfig(model=str(base_dir)))


def test_dptrainer_trains_qlora_with_epsilon_logged(base_dir, tmp_path):
    """DPTrainer over the 4-bit base: the loss check (eval mode, no grad), steps, epsilon; only LoRA moves."""
    from ghostdp.integrations.hf.trainer import DPTrainer
    from tests.hf.trainer_helpers import collator, make_args, make_data

    model = qlora_model(base_dir, targets=("q_proj", "v_proj"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(tmp_path, max_steps=3, noise_multiplier=0.5, learning_rate=0.1)
    trainer = DPTrainer(model=model, args=args, train_dataset=make_data(24), data_collator=collator())
    trainer.train()
    assert trainer.privacy_engine.steps == 3 and trainer.current_epsilon() > 0
    # Float tensors only: bitsandbytes may repack the 4-bit weights for its CPU kernel in eval mode (same values,
    # another layout), and those cannot require grad anyway.
    moved = {n for n, p in model.named_parameters() if p.is_floating_point() and not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and all("lora_" in n for n in moved)

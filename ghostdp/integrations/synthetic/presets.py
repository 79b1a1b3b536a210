"""Named starting points for ``ghostdp ... --preset NAME``: override layers over the dataclass defaults.

A preset is a ``{section: {key: value}}`` dict in the same shape as a TOML config file, so a file or
flags can change any of its values (``ghostdp pipeline --preset cpu-demo --num-samples 100``).

``cpu-demo``
    Sized for a 2-core CPU (``make demo``, which runs it with ``--threads auto``). The embedded
    SmolLM2-135M-Instruct gets rank-4 LoRA adapters on q_proj and v_proj of its top 10 blocks (so the backward pass
    stops there) and 8 DP-SGD steps of 256 expected examples from a seeded 20,000-row slice of SST-2 train (the
    private data) at epsilon 3, plus 0.1 for the label proportions. The compute is that of one pass over 2,000 rows;
    the larger private set only lowers the sample rate (0.0128 instead of 0.128), so the same epsilon needs sigma
    0.56 instead of 0.89 (the DP-on-real baseline also trains on all 20,000 rows; embedding them for the real-data
    baselines costs about 50 s). Measured with 3 seeds each (bench/results/utility_cpu.md, session 5): synthetic
    0.654 vs 0.638, generator as classifier 0.725 vs 0.698. A smaller file is used whole (with a warning), as
    ``--train-rows none`` would. The label goes in through the model's chat template: the user turn "Write one
    sentence from a {label} movie review." (empty system message), the text as the assistant's reply, max_length 36
    (23 prefix tokens). The un-finetuned model already follows that instruction (zero-shot likelihood-ratio accuracy
    0.757 on 300 SST-2 dev rows, against 0.627 with the earlier plain prefix "A {label} movie review:\n"), and it is
    the same prompt the prior-knowledge floor gets. 240 samples of at most the training rows' token budget, kept
    only when the DP generator scores them as their own label (``filter_margin`` 0: post-processing, no privacy
    cost), and only the half of each sampled batch it scores most clearly so (``filter_top_fraction`` 0.5, about
    twice the sampling: with the same three generators, synthetic accuracy 0.6775 vs 0.654 and label fidelity
    0.857 vs 0.769, bench/results/utility_cpu.md session 6). The floor, as many samples of the un-finetuned
    model, is filtered the same way by the base model (a smaller floor would flatter the synthetic set, e.g. 0.61
    with 120 floor samples vs 0.66 with 720). Then the linear probe, the DP linear head, the DP generator as a
    zero-shot classifier. Chosen by measurement
    (bench/results/utility_cpu.md): the training recipe over the earlier 16 steps of 64 with rank 8 on q/k/v/o, and
    the chat template over the plain prefix (label fidelity 0.77 vs 0.65 in one run each, same synthetic accuracy).
    With this little compute and the DP noise drawn afresh each run, the accuracy moves by several points between
    runs (``ghostdp pipeline --seeds 3`` reports the spread). On 2,500 IMDB long reviews (``bench/long_reviews.py``)
    the same preset gives 0.744 ± 0.009 over 3 runs (label fidelity 0.794), above real rows of the same count and
    13-token cap (0.686). For other data, write the instruction for it.

``sst2-full``
    The full-size run, meant for one GPU and not run on the CPU: all 67,349 SST-2 train rows,
    epsilon 4 in total (3.9 for DP-SGD + 0.1 for the label proportions, basic composition), LoRA on every
    projection, logical batch 1024 for 3 epochs (about 200 steps), bf16, 10,000 samples, fine-tuned
    MiniLM classifiers (non-private on synthetic/real, DP-SGD on real for the baseline), perplexity on
    all of SST-2 dev. Not run or timed yet (no GPU was available when it was written): check the
    first run's timings in its log before relying on it.

``study-cpu``
    One cell of ``ghostdp study`` (the fine-tuning method x epsilon grid) for a 2-core CPU, on 2,000 SST-2 train
    rows: cpu-demo's LoRA placement with the plain prefix "A {label} movie review:\n" and max_length 24, 12 DP steps
    of 64 expected examples, 160 samples (and as many floor samples; every candidate above the margin is kept,
    not cpu-demo's top half of each batch), a 300-row held-out slice and 32 perplexity rows. Prompt tuning: 20 randomly initialised virtual tokens (11,520 parameters on SmolLM2-135M); full
    fine-tuning trains all 134.5M parameters. The cells share their evaluation's fixed parts (embeddings of the real
    rows, the base model's perplexity, the prior-knowledge floor: ``shared_eval``). Measured on the project's 2-core
    CPU (bench/results/study_cpu.md): the whole 12-cell grid ``--methods lora,prompt,full --epsilons 1,3,8,inf
    --seeds 1 --method-lr lora=1e-2,prompt=5e-2,full=2e-4`` in 53 minutes (3-4 minutes a LoRA cell, 5-6 a prompt
    cell, 4-5 a full cell); each further seed adds about as much. ``--summarize-only`` tabulates a grid cut short.

``study-gpu``
    The full-size study for one GPU, documented, not run: ``ghostdp study --preset study-gpu --methods
    lora,prompt,full --epsilons 1,3,8,inf --seeds 3 --method-lr lora=2e-3,prompt=5e-2,full=2e-4``: each of
    the 36 cells is the ``sst2-full`` run (all of SST-2 train, 3 epochs of logical batch 1024, bf16, 10,000
    samples, fine-tuned MiniLM classifiers) with a per-method learning rate, so expect 36 times one
    sst2-full run.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "preset_layer"]

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu-demo": {
        "data": {"train_data": "sst2:train", "eval_data": "sst2:dev", "train_rows": 20000, "eval_rows": 400},
        "train": {
            "model": "smollm2-135m", "method": "lora", "lora_rank": 4, "lora_alpha": 8.0,
            "lora_targets": ("q_proj", "v_proj"), "lora_layers": 10,
            "target_epsilon": 3.0, "label_epsilon": 0.1, "max_grad_norm": 1.0,
            "logical_batch_size": 256, "physical_batch_size": 32, "max_steps": 8, "learning_rate": 1e-2,
            "lr_scheduler": "constant", "max_length": 36, "template": "Write one sentence from a {label} movie review.",
            "chat_template": True, "system_prompt": "", "use_cpu": True,
        },
        "synthesize": {
            "num_samples": 240, "label_proportions": "dp", "temperature": 1.0, "top_p": 0.95, "top_k": 0,
            "max_new_tokens": None, "gen_batch_size": 40, "filter_margin": 0.0, "filter_top_fraction": 0.5,
        },
        "evaluate": {
            "classifier": "linear_probe", "dp_classifier": "linear_probe", "dp_steps": 200, "dp_batch_size": 256,
            "dp_learning_rate": 0.05, "floor_samples": None, "perplexity_rows": 64,
        },
    },
    "sst2-full": {
        "data": {"train_data": "sst2:train", "eval_data": "sst2:dev", "train_rows": None, "eval_rows": None},
        "train": {
            "model": "smollm2-135m", "method": "lora", "lora_rank": 16, "lora_alpha": 32.0,
            "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "target_epsilon": 3.9, "label_epsilon": 0.1, "max_grad_norm": 1.0,
            "logical_batch_size": 1024, "physical_batch_size": 128, "num_train_epochs": 3.0, "max_steps": None,
            "learning_rate": 2e-3, "lr_scheduler": "constant", "max_length": 64, "bf16": True, "use_cpu": False,
        },
        "synthesize": {
            "num_samples": 10000, "label_proportions": "dp", "temperature": 1.0, "top_p": 0.95, "top_k": 0,
            "max_new_tokens": 64, "gen_batch_size": 256,
        },
        "evaluate": {
            "classifier": "minilm", "dp_classifier": "minilm", "dp_steps": 400, "dp_batch_size": 1024,
            "dp_learning_rate": 5e-4, "floor_samples": None, "perplexity_rows": None,
        },
    },
}
PRESETS["study-cpu"] = copy.deepcopy(PRESETS["cpu-demo"])
PRESETS["study-cpu"]["data"].update(train_rows=2000, eval_rows=300)
PRESETS["study-cpu"]["train"].update(logical_batch_size=64, max_steps=12, prompt_tokens=20, max_length=24,
                                     template="A {label} movie review:\n", chat_template=False)
PRESETS["study-cpu"]["synthesize"].update(num_samples=160, filter_top_fraction=1.0)  # as measured in study_cpu.md
PRESETS["study-cpu"]["evaluate"].update(dp_steps=100, perplexity_rows=32)
PRESETS["study-gpu"] = copy.deepcopy(PRESETS["sst2-full"])
PRESETS["study-gpu"]["train"].update(prompt_tokens=20)


def preset_layer(name: str) -> dict[str, dict[str, Any]]:
    """A copy of preset ``name`` as an override layer (plus ``preset``), or ValueError listing the presets."""
    if name not in PRESETS:
        from ghostdp.integrations.synthetic.config import ConfigError

        raise ConfigError(f"--preset {name!r}: unknown preset. Available: {', '.join(PRESETS)}.")
    layer: dict[str, Any] = copy.deepcopy(PRESETS[name])
    layer["preset"] = name
    return layer

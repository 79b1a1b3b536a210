"""The prompt prefix that conditions DP synthetic text on its label.

Training sees ``prefix(label) + text + EOS`` and is scored on the text and the EOS only; generation
feeds ``prefix(label)`` and samples until EOS. The default prefix ``"[{dataset}][{label}]: "`` gives e.g.
``"[sst2][positive]: "`` (the label-as-prefix scheme of Yue et al., ACL 2023, "Synthetic Text Generation
with Differential Privacy: A Simple and Practical Recipe").

Only the dataset name and the label name go into the prefix: both are public (the label set is part of
the task definition), so conditioning on them costs no privacy.

With ``chat=True`` the filled template is an instruction, put in the tokenizer's chat template as the user
turn (after an optional system message), and the text is the assistant's reply, ended by the model's
end-of-turn token (its EOS). An instruction-tuned base model then follows the label from the start: with
SmolLM2-135M-Instruct on 300 SST-2 dev rows, the un-finetuned model's likelihood-ratio classification
(``label_scoring.LabelScorer``) was 0.757 accurate with the instruction "Write one sentence from a {label}
movie review." and an empty system message, against 0.627 for the plain prefix "A {label} movie review:\n"
(bench/results/utility_cpu.md).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

_ALLOWED_FIELDS = frozenset({"dataset", "label"})


@dataclass(frozen=True)
class PromptTemplate:
    """A ``str.format`` template with the fields ``{label}`` (required) and ``{dataset}`` (optional).

    Args:
        template: e.g. ``"[{dataset}][{label}]: "``. Must contain ``{label}``: without it every class
            gets the same prefix and the generator cannot be asked for a class.
        dataset: the value of ``{dataset}``.
        chat: put the filled template in the tokenizer's chat template as the user turn, the text being the
            assistant's reply (:meth:`prefix_text`).
        system: with ``chat``, the system message; ``""`` an empty one (short, and no persona), ``None`` none
            at all (the chat template's own default, e.g. SmolLM2's "You are a helpful AI assistant...").
    """

    template: str = "[{dataset}][{label}]: "
    dataset: str = "sst2"
    chat: bool = False
    system: str | None = ""

    def __post_init__(self) -> None:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as exc:
            raise ValueError(f"PromptTemplate.template={self.template!r} is not a valid format string: {exc}") from exc
        unknown = sorted(set(fields) - _ALLOWED_FIELDS)
        if unknown:
            raise ValueError(
                f"PromptTemplate.template={self.template!r} uses {unknown}; only {{dataset}} and {{label}} "
                "are filled in. Write literal braces as {{ and }}."
            )
        if "label" not in fields:
            raise ValueError(
                f"PromptTemplate.template={self.template!r} has no {{label}}: every class would get the same "
                "prefix, and generation could not be conditioned on the label. Add {label}."
            )

    def prefix(self, label: str) -> str:
        """The prefix string for ``label``, e.g. ``"[sst2][positive]: "``."""
        return self.template.format(dataset=self.dataset, label=label)

    def prefix_text(self, label: str, tokenizer=None) -> str:
        """The exact string training and generation start from for ``label``.

        Without ``chat``: :meth:`prefix`. With ``chat``: the tokenizer's chat template applied to the
        (system and) user message :meth:`prefix`, with the assistant's generation prompt, so the text
        follows as the assistant's reply. Raises ValueError when ``chat`` is set and the tokenizer has no
        chat template.
        """
        if not self.chat:
            return self.prefix(label)
        return self._render_chat(tokenizer, [{"role": "user", "content": self.prefix(label)}],
                                 add_generation_prompt=True)

    def _render_chat(self, tokenizer, turns: list[dict], *, add_generation_prompt: bool) -> str:
        """``turns`` after the system message (if any) through the tokenizer's chat template, as a string."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"PromptTemplate(chat=True): {type(tokenizer).__name__} has no chat template, so there is no "
                "user/assistant format to put the instruction in. Use an instruction-tuned model's tokenizer, or "
                "chat=False (train.chat_template=false) for a plain prefix."
            )
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        return tokenizer.apply_chat_template(messages + turns, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)

    def end_of_turn_id(self, tokenizer) -> int | None:
        """With ``chat``: the token that ends an assistant turn in the tokenizer's chat template, found by
        rendering a reply and reading the first token after it (SmolLM2: ``<|im_end|>``); None without
        ``chat`` or when the template writes nothing after a reply. The collator ends texts with it, so the
        model learns the chat format's own stop (a tokenizer's ``eos_token`` need not be it: transformers
        4.57 reads SmolLM2's GGUF with ``eos_token="<|im_start|>"``)."""
        if not self.chat:
            return None
        marker = "\u2063ghostdp-reply\u2063"
        rendered = self._render_chat(tokenizer, [{"role": "user", "content": "x"},
                                                 {"role": "assistant", "content": marker}], add_generation_prompt=False)
        at = rendered.find(marker)
        if at < 0:
            return None
        ids = tokenizer(rendered[at + len(marker):], add_special_tokens=False)["input_ids"]
        return int(ids[0]) if ids else None

    def prefixes(self, labels: tuple[str, ...] | list[str]) -> dict[str, str]:
        """``{label: prefix}`` for each label; raises if two labels would share a prefix."""
        out = {label: self.prefix(label) for label in labels}
        if len(set(out.values())) != len(out):
            raise ValueError(f"PromptTemplate {self.template!r} maps different labels to one prefix: {out}.")
        return out

"""The prompt prefix that conditions DP synthetic text on its label.

Training sees ``prefix(label) + text + EOS`` and is scored on the text and the EOS only; generation
feeds ``prefix(label)`` and samples until EOS. The default prefix ``"[{dataset}][{label}]: "`` gives e.g.
``"[sst2][positive]: "`` (the label-as-prefix scheme of Yue et al., ACL 2023, "Synthetic Text Generation
with Differential Privacy: A Simple and Practical Recipe").

Only the dataset name and the label name go into the prefix: both are public (the label set is part of
the task definition), so conditioning on them costs no privacy.
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
    """

    template: str = "[{dataset}][{label}]: "
    dataset: str = "sst2"

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

    def prefixes(self, labels: tuple[str, ...] | list[str]) -> dict[str, str]:
        """``{label: prefix}`` for each label; raises if two labels would share a prefix."""
        out = {label: self.prefix(label) for label in labels}
        if len(set(out.values())) != len(out):
            raise ValueError(f"PromptTemplate {self.template!r} maps different labels to one prefix: {out}.")
        return out

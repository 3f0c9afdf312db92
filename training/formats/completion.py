"""`type: completion`: raw text, every token trained, EOS appended, cut into sequence_len chunks."""

from __future__ import annotations

from training.formats.base import Piece, Rendered, RowProblem, Span


class Completion:
    name = "completion"

    def looks_like(self, row: dict) -> bool:
        return isinstance(row.get("text"), str)

    def check(self, row, spec) -> list[RowProblem]:
        value = row.get(spec.field)
        if value is None:
            return [RowProblem(spec.field, "missing")]
        if not isinstance(value, str):
            return [RowProblem(spec.field, f"must be a string, not {type(value).__name__}")]
        if not value.strip():
            return [RowProblem(spec.field, "empty")]
        return []

    def render(self, row, spec, options) -> Rendered:
        text = row[spec.field]
        return Rendered(
            pieces=[
                Piece(text, add_special_tokens=True, whole=Span(0, len(text), True, 0), append_eos=Span(0, 0, True, 0))
            ],
            parts=["text"],
            split_every=options.sequence_len,
            # Axolotl's cap: a text is cut at 64 x sequence_len tokens (and then gets no EOS).
            max_tokens=options.sequence_len * 64,
        )


FORMAT = Completion()

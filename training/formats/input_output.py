"""`type: input_output`: template-free segments, each tokenized alone and trained if `label: true`.

No BOS or EOS is added: the segments are the whole sample, as in axolotl.
"""

from __future__ import annotations

from training.formats.base import Piece, Rendered, RowProblem, Span


class InputOutput:
    name = "input_output"

    def looks_like(self, row: dict) -> bool:
        return isinstance(row.get("segments"), list)

    def check(self, row, spec) -> list[RowProblem]:
        segments = row.get(spec.field_segments)
        if segments is None:
            return [RowProblem(spec.field_segments, "missing")]
        if not isinstance(segments, list):
            return [RowProblem(spec.field_segments, f"must be a list, not {type(segments).__name__}")]
        if not segments:
            return [RowProblem(spec.field_segments, "empty list")]
        problems = []
        for i, seg in enumerate(segments):
            where = f"{spec.field_segments}[{i}]"
            if not isinstance(seg, dict):
                problems.append(RowProblem(where, "must be an object with text and label"))
                continue
            if not isinstance(seg.get("text"), str):
                problems.append(RowProblem(f"{where}.text", "missing" if "text" not in seg else "must be a string"))
            if "label" in seg and not isinstance(seg["label"], bool):
                problems.append(RowProblem(f"{where}.label", "must be true or false"))
        return problems

    def render(self, row, spec, options) -> Rendered:
        segments = row[spec.field_segments]
        pieces = [
            Piece(
                seg["text"], whole=Span(0, len(seg["text"]), bool(seg.get("label", True)) or options.train_on_inputs, i)
            )
            for i, seg in enumerate(segments)
        ]
        parts = [f"segment {i} ({'trained' if seg.get('label', True) else 'masked'})" for i, seg in enumerate(segments)]
        return Rendered(pieces=pieces, parts=parts)


FORMAT = InputOutput()

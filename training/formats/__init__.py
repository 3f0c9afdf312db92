"""Dataset formats: one module per format, one registry. A format renders a row into text pieces.

A format never builds labels itself. It says *which characters* are trained (spans in the text it
renders) and how each piece is tokenized; `training.encode` tokenizes every piece of a batch at once
and turns spans into labels in one place. That keeps the preview and the trainer on one path.
"""

from __future__ import annotations

from training.formats import alpaca, chat_template, completion, input_output
from training.formats.base import EncodeOptions, Format, Piece, Rendered, RowProblem, Span

FORMATS: dict[str, Format] = {m.FORMAT.name: m.FORMAT for m in (chat_template, alpaca, completion, input_output)}


def detect_format(row: dict) -> str | None:
    """The format whose fields a row has; chat first, as its `messages` key is unambiguous."""
    for name in ("chat_template", "input_output", "alpaca", "completion"):
        if FORMATS[name].looks_like(row):
            return name
    return None


__all__ = ["FORMATS", "EncodeOptions", "Format", "Piece", "Rendered", "RowProblem", "Span", "detect_format"]

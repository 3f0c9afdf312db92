"""`type: alpaca` (and `alpaca:chat`, `alpaca:chatml`): instruction / input / output rows.

As in axolotl, the prompt and the response are tokenized separately and EOS is appended to the
response; the prompt is trained only with `train_on_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.formats.base import Piece, Rendered, RowProblem, Span

SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class PromptStyle:
    system: str  # format of the system line, {system}
    turn: str  # {instruction} {input}
    turn_no_input: str  # {instruction}


STYLES = {
    None: PromptStyle(
        "{system}\n\n",
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "chat": PromptStyle(
        "SYSTEM: {system}\n", "USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:"
    ),
    "chatml": PromptStyle(
        "<|im_start|>system\n{system}<|im_end|>\n",
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
    ),
}
STYLES["instruct"] = STYLES[None]
STYLES["phi"] = PromptStyle(
    "<|system|>\n{system}<|end|>\n",
    "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
    "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
)


class Alpaca:
    name = "alpaca"

    def looks_like(self, row: dict) -> bool:
        return "instruction" in row and "output" in row

    def check(self, row, spec) -> list[RowProblem]:
        problems = []
        if spec.prompt_style not in STYLES:
            problems.append(RowProblem("type", f"unknown alpaca prompt style {spec.prompt_style!r}"))
        for key, required in ((spec.field_instruction, True), (spec.field_input, False), (spec.field_output, True)):
            value = row.get(key)
            if value is None:
                if required:
                    problems.append(RowProblem(key, "missing"))
            elif not isinstance(value, str):
                problems.append(RowProblem(key, f"must be a string, not {type(value).__name__}"))
        if isinstance(row.get(spec.field_instruction), str) and not row[spec.field_instruction].strip():
            problems.append(RowProblem(spec.field_instruction, "empty"))
        return problems

    def render(self, row, spec, options) -> Rendered:
        style = STYLES[spec.prompt_style]
        instruction, user_input = row[spec.field_instruction], row.get(spec.field_input) or ""
        if user_input:
            prompt = style.system.format(system=SYSTEM_WITH_INPUT) + style.turn.format(
                instruction=instruction, input=user_input
            )
        else:
            prompt = style.system.format(system=SYSTEM_NO_INPUT) + style.turn_no_input.format(instruction=instruction)
        response = row[spec.field_output]
        return Rendered(
            pieces=[
                Piece(prompt, add_special_tokens=True, whole=Span(0, len(prompt), options.train_on_inputs, 0)),
                # An empty output gets no EOS (as in axolotl), so the row has nothing to train.
                Piece(
                    response,
                    whole=Span(0, len(response), True, 1),
                    append_eos=Span(0, 0, True, 1) if response else None,
                ),
            ],
            parts=["prompt", "response"],
        )


FORMAT = Alpaca()

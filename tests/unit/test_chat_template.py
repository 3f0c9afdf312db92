"""chat_template masking on the tiny ChatML tokenizer: axolotl's options and defaults."""

from __future__ import annotations

import pytest

from tests.helpers import trained_runs
from training.config import DatasetSpec
from training.encode import Dropped, Encoded, Encoder
from training.formats.chat_template import LLAMA3

# The demo tokenizer (ChatML) has no BOS token, which axolotl's llama3 template prints first.
LLAMA3_WITHOUT_BOS = LLAMA3.replace("bos_token + content", "content")

CONVO = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "2 plus 2 is 4."},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "3 plus 3 is 6."},
    ]
}


def encode(tokenizer, row=CONVO, **options) -> Encoded | Dropped:
    top = {
        k: options.pop(k)
        for k in (
            "train_on_inputs",
            "sequence_len",
            "eot_tokens",
            "chat_template",
            "chat_template_jinja",
            "excess_length_strategy",
        )
        if k in options
    }
    encoder = Encoder(tokenizer, DatasetSpec(path="x", **options), **top)
    (outcome,) = encoder.encode_row(row)
    return outcome


def test_default_trains_assistant_content_and_its_end_of_turn_only(tokenizer):
    sample = encode(tokenizer)
    assert trained_runs(tokenizer, sample) == ["2 plus 2 is 4.<|im_end|>", "3 plus 3 is 6.<|im_end|>"]


def test_input_ids_are_the_tokenized_rendered_template(tokenizer):
    sample = encode(tokenizer)
    rendered = tokenizer.apply_chat_template(CONVO["messages"], tokenize=False)
    assert sample.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_roles_to_train_adds_user_turns(tokenizer):
    sample = encode(tokenizer, roles_to_train=["assistant", "user"])
    assert trained_runs(tokenizer, sample) == [
        "What is 2 plus 2?<|im_end|>",
        "2 plus 2 is 4.<|im_end|>",
        "And 3 plus 3?<|im_end|>",
        "3 plus 3 is 6.<|im_end|>",
    ]


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("turn", ["2 plus 2 is 4.<|im_end|>", "3 plus 3 is 6.<|im_end|>"]),
        ("none", ["2 plus 2 is 4.", "3 plus 3 is 6."]),
        ("last", ["2 plus 2 is 4.", "3 plus 3 is 6.<|im_end|>"]),
        ("all", ["<|im_end|>", "<|im_end|>", "2 plus 2 is 4.<|im_end|>", "<|im_end|>", "3 plus 3 is 6.<|im_end|>"]),
    ],
)
def test_train_on_eos_policies(tokenizer, policy, expected):
    assert trained_runs(tokenizer, encode(tokenizer, train_on_eos=policy)) == expected


def test_train_on_inputs_trains_every_message_but_never_role_headers(tokenizer):
    sample = encode(tokenizer, train_on_inputs=True)
    runs = trained_runs(tokenizer, sample)
    assert runs[0] == "Be brief.<|im_end|>"
    assert all("<|im_start|>" not in r and "assistant\n" not in r for r in runs)


def test_message_training_flag_overrides_the_role_when_configured(tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Bad answer.", "training": False},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Good answer."},
        ]
    }
    configured = encode(tokenizer, row, message_field_training="training")
    assert trained_runs(tokenizer, configured) == ["Good answer.<|im_end|>"]
    # As in axolotl, the key means nothing unless message_field_training names it.
    assert trained_runs(tokenizer, encode(tokenizer, row)) == ["Bad answer.<|im_end|>", "Good answer.<|im_end|>"]


def test_training_detail_trains_only_the_given_character_span(tokenizer):
    content = "The capital of France is Paris."
    start = content.index("Paris")
    row = {
        "messages": [
            {"role": "user", "content": "Capital?"},
            {
                "role": "assistant",
                "content": content,
                "training_detail": [{"begin_offset": start, "end_offset": start + len("Paris") - 1, "train": True}],
            },
        ]
    }
    runs = trained_runs(tokenizer, encode(tokenizer, row, message_field_training_detail="training_detail"))
    assert runs[0].strip() == "Paris"


def test_custom_fields_and_sharegpt_role_names(tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hello!"}]}
    sample = encode(
        tokenizer, row, field_messages="conversations", message_property_mappings={"role": "from", "content": "value"}
    )
    assert trained_runs(tokenizer, sample) == ["Hello!<|im_end|>"]
    assert "<|im_start|>user" in tokenizer.decode(sample.input_ids)


def test_drop_system_message_drops_the_leading_system_turn_only(tokenizer):
    sample = encode(tokenizer, drop_system_message=True)
    assert "Be brief." not in tokenizer.decode(sample.input_ids)
    later = {"messages": CONVO["messages"][1:3] + [{"role": "system", "content": "Now be verbose."}]}
    assert "Now be verbose." in tokenizer.decode(encode(tokenizer, later, drop_system_message=True).input_ids)


def test_template_that_trims_content_still_finds_the_trained_span(tokenizer):
    row = {"messages": [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "\n Hello there. \n"}]}
    sample = encode(
        tokenizer, row, chat_template="jinja", chat_template_jinja=LLAMA3_WITHOUT_BOS, eot_tokens=["<|eot_id|>"]
    )
    text = tokenizer.decode(sample.input_ids)
    assert "Hello there.<|eot_id|>" in text  # llama3 template trims content
    assert trained_runs(tokenizer, sample) == ["Hello there.<|eot_id|>"]


def test_missing_end_of_turn_token_is_reported_loudly(tokenizer):
    encoder = Encoder(tokenizer, DatasetSpec(path="x"), chat_template_jinja=LLAMA3_WITHOUT_BOS)
    (sample,) = encoder.encode_row(CONVO)
    assert isinstance(sample, Encoded)
    assert not any("<|im_end|>" in r for r in trained_runs(tokenizer, sample))
    warnings = encoder.warnings()
    assert warnings and "no end-of-turn token" in warnings[0] and "eot_tokens" in warnings[0]


SYSTEM_FIRST = (  # prints the system prompt first, wherever it is in the list, with no end-of-turn token
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_turn_never_takes_the_end_of_turn_token_of_a_turn_printed_after_it(tokenizer, one_pass):
    """The system turn is last in the row but first in the text: the <|im_end|> after the user's
    turn is the user's, not the system's. The first row of a shape (rendered for real) and the
    next ones (spliced into the cached skeleton) agree."""
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]}
    encoder = Encoder(
        tokenizer,
        DatasetSpec(path="x", roles_to_train=["system"], train_on_eos="turn"),
        chat_template_jinja=SYSTEM_FIRST,
    )
    if not one_pass:
        encoder._render_valid = None
    first, again = encoder.encode_rows([(0, row), (1, row)])
    (trained,) = trained_runs(tokenizer, first)
    assert trained.startswith("Be brief.") and "<|im_end|>" not in trained  # ".\n" is one token here
    assert trained_runs(tokenizer, again) == [trained]
    assert first.labels == again.labels
    assert encoder.warnings()[0].startswith("no end-of-turn token (<|im_end|>) after a system turn")


def test_row_with_only_user_turns_is_dropped_not_trained(tokenizer):
    row = {"messages": [{"role": "user", "content": "Anyone there?"}]}
    outcome = encode(tokenizer, row)
    assert isinstance(outcome, Dropped) and outcome.reason == "no_trained_tokens"
    assert outcome.sample is not None  # the preview can still show it


def test_tokenizer_without_chat_template_asks_for_one(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat_template: chatml"):
        Encoder(plain, DatasetSpec(path="x"))


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"messages": []}, "messages", "empty message list"),
        ({"messages": [{"role": 7, "content": "x"}]}, "messages[0].role", "must be a string"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "must be a string"),
        ({"text": "hi"}, "messages", "missing"),
    ],
)
def test_invalid_rows_name_the_field(tokenizer, row, field, message):
    outcome = encode(tokenizer, row)
    assert isinstance(outcome, Dropped) and outcome.reason == "invalid"
    assert f"{field}: " in outcome.detail and message in outcome.detail


def test_eos_and_eot_policies_that_contradict_each_other_are_refused(tokenizer):
    spec = DatasetSpec(path="x", train_on_eos="all", train_on_eot="turn")
    with pytest.raises(ValueError, match="train_on_eos .all. and train_on_eot .turn. disagree"):
        Encoder(tokenizer, spec, eot_tokens=["<|im_end|>", "<|im_start|>"])
    Encoder(tokenizer, spec)  # eot_tokens left to the eos token: the two passes simply add up
    Encoder(
        tokenizer,
        DatasetSpec(path="x", train_on_eos="turn", train_on_eot="turn"),
        eot_tokens=["<|im_end|>", "<|im_start|>"],
    )


def test_an_assistant_turn_that_only_calls_tools_trains_its_calls(tokenizer):
    template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] %}{{ message['content'] }}{% endif %}"
        "{% for c in message['tool_calls'] or [] %}<tool_call>{{ c['function']['name'] }} "
        "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    )
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    row = {
        "messages": [
            {"role": "user", "content": "Add"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "2"},
            {"role": "assistant", "content": "It is 2."},
        ]
    }
    sample = encode(tokenizer, row, chat_template="jinja", chat_template_jinja=template)
    assert trained_runs(tokenizer, sample) == ['<tool_call>add {"a": 2}</tool_call><|im_end|>', "It is 2.<|im_end|>"]

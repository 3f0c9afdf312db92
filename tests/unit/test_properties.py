"""Properties of the encoder and packer, over generated conversations (hypothesis)."""

from __future__ import annotations

import unicodedata

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.config import DatasetSpec
from training.encode import IGNORE_INDEX, Encoded, Encoder
from training.packing import pack

ROLES = ["system", "user", "assistant", "tool"]
# Printable text with spaces and newlines; no characters of the template's special tokens.
text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"], exclude_characters="<|>")
    | st.sampled_from([" ", "\n", "\t"]),
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip())
message = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": text})
conversation = st.lists(message, min_size=1, max_size=6)
options = st.fixed_dictionaries(
    {
        "roles_to_train": st.lists(st.sampled_from(ROLES), min_size=1, max_size=3, unique=True),
        "train_on_eos": st.sampled_from(["turn", "all", "last", "none"]),
    }
)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(messages=conversation, opts=options, train_on_inputs=st.booleans())
def test_labels_are_ignored_or_equal_to_input_ids(tokenizer, messages, opts, train_on_inputs):
    encoder = Encoder(tokenizer, DatasetSpec(path="x", **opts), train_on_inputs=train_on_inputs, sequence_len=4096)
    for outcome in encoder.encode_row({"messages": messages}):
        sample = outcome if isinstance(outcome, Encoded) else outcome.sample
        assert len(sample.labels) == len(sample.input_ids)
        assert all(label in (IGNORE_INDEX, tid) for tid, label in zip(sample.input_ids, sample.labels))


@SETTINGS
@given(messages=conversation, opts=options)
def test_trained_tokens_are_trained_content_plus_requested_end_of_turn(tokenizer, messages, opts):
    spec = DatasetSpec(path="x", **opts)
    encoder = Encoder(tokenizer, spec, sequence_len=4096)
    (outcome,) = encoder.encode_row({"messages": messages})
    sample = outcome if isinstance(outcome, Encoded) else outcome.sample
    trained_roles = set(opts["roles_to_train"])
    # Every trained token lies in a message of a trained role (or is the eot of a message `all` trains).
    for part, label in zip(sample.token_parts, sample.labels):
        if label != IGNORE_INDEX:
            assert part >= 0
            role = sample.parts[part].split(" #")[0]
            assert role in trained_roles or opts["train_on_eos"] in ("all", "last")
    # Decoding the trained tokens of each message gives its content, then the eot token if asked.
    last_trained = max((i for i, m in enumerate(messages) if m["role"] in trained_roles), default=None)
    for i, msg in enumerate(messages):
        ids = [
            t
            for t, p, lab in zip(sample.input_ids, sample.token_parts, sample.labels)
            if p == i and lab != IGNORE_INDEX
        ]
        trained = msg["role"] in trained_roles
        eot = {"turn": trained, "all": True, "none": False, "last": i == last_trained}[opts["train_on_eos"]]
        # The tokenizer NFC-normalizes text, so compare with the normalized content.
        content = unicodedata.normalize("NFC", msg["content"])
        expected = (content if trained else "") + ("<|im_end|>" if eot else "")
        assert tokenizer.decode(ids) == expected


@SETTINGS
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=40),
    sequence_len=st.integers(min_value=60, max_value=200),
)
def test_packing_keeps_every_token_in_order_with_restarting_positions(lengths, sequence_len):
    samples = [Encoded(i, list(range(1000 * i, 1000 * i + n)), [7] * n, [0] * n, ["x"]) for i, n in enumerate(lengths)]
    bins = pack(samples, sequence_len)
    seen = []
    for b in bins:
        assert len(b.input_ids) <= sequence_len
        offset = 0
        for i in b.samples:
            n = len(samples[i].input_ids)
            assert b.input_ids[offset : offset + n] == samples[i].input_ids
            assert b.labels[offset : offset + n] == [IGNORE_INDEX] + samples[i].labels[1:]
            assert b.position_ids[offset : offset + n] == list(range(n))
            offset += n
        assert offset == len(b.input_ids)
        seen += b.samples
    assert sorted(seen) == list(range(len(samples)))


SPACED = (  # the end-of-turn token apart from the content, and a system turn printed first
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n"
    "{{ eos_token }}{% endif %}{% endfor %}"
)


@SETTINGS
@given(
    messages=st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from([*ROLES, "human", "gpt"]), "content": text | st.sampled_from(["", "  "])}
        ),
        min_size=1,
        max_size=6,
    ),
    opts=options,
    template=st.sampled_from(["tokenizer_default", "chatml", "llama3", SPACED]),
    train_on_inputs=st.booleans(),
)
def test_the_one_pass_path_gives_what_check_then_render_gives(tokenizer, messages, opts, template, train_on_inputs):
    """Rows of the common shape skip check() and the full render (ChatTemplate.render_valid): the
    samples, labels, parts and warnings must be those of the general path, for every template."""
    named = template in ("tokenizer_default", "chatml", "llama3")
    spec = DatasetSpec(path="x", **opts)

    def encode(one_pass: bool):
        encoder = Encoder(
            tokenizer,
            spec,
            train_on_inputs=train_on_inputs,
            sequence_len=4096,
            chat_template=template if named else "jinja",
            chat_template_jinja=None if named else template,
        )
        if not one_pass:
            encoder._render_valid = None
        rows = [(0, {"messages": messages}), (1, {"messages": messages[::-1]}), (2, {"messages": messages})]
        return [vars(o) for o in encoder.encode_rows(rows)], encoder.warnings()

    one_pass, general = encode(True), encode(False)
    assert one_pass == general

    # The general path's first row of a shape (a real render) and its later rows (the cached
    # skeleton) agree too: rows 0 and 2 are the same conversation.
    def without_row(outcome: dict) -> dict:
        return {k: without_row(vars(v)) if k == "sample" and v else v for k, v in outcome.items() if k != "row"}

    assert without_row(general[0][0]) == without_row(general[0][-1])

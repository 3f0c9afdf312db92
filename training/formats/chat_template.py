"""`type: chat_template`: conversations rendered by a jinja chat template, trained by role.

Trained characters are found without assumptions about any one template: the conversation is
rendered once with a unique marker in place of each message's content (the template's own text is
what remains around the markers) and once for real; splicing the contents into the marked render
must give the real one, else the contents are located between the template's fixed segments. The
end-of-turn token of a message is the first eot token string after its content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from training.formats.base import Piece, Rendered, RowProblem, Span

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}

# Axolotl's default role names: the template's role -> names a dataset may use for it.
DEFAULT_ROLES = {
    "user": ["human", "user"],
    "assistant": ["gpt", "assistant"],
    "system": ["system"],
    "tool": ["tool"],
}

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # private-use characters: never in real text, kept by trim
_MARKER_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


def resolve_chat_template(name: str | None, jinja: str | None, tokenizer_template: str | None) -> str:
    """Axolotl's `chat_template` names -> jinja text. Raises ValueError with the fix."""
    name = name or "tokenizer_default"
    if jinja and name in ("jinja", "tokenizer_default"):
        return jinja
    if name == "jinja":
        raise ValueError("chat_template: jinja needs chat_template_jinja")
    if name in ("tokenizer_default", "tokenizer_default_fallback_chatml"):
        if tokenizer_template:
            return tokenizer_template
        if name == "tokenizer_default_fallback_chatml":
            return CHATML
        raise ValueError("the tokenizer has no chat template; set chat_template: chatml (or another name) "
                         "or chat_template_jinja")
    if name.startswith("tokenizer_default_fallback_"):
        return tokenizer_template or NAMED_TEMPLATES[name.removeprefix("tokenizer_default_fallback_")]
    if name not in NAMED_TEMPLATES:
        raise ValueError(f"unknown chat_template {name!r}; choose tokenizer_default, jinja or one of "
                         f"{', '.join(NAMED_TEMPLATES)}")
    return NAMED_TEMPLATES[name]


def _compile(template: str):
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # transformers moved its private helper: fall back to a plain sandbox
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template)
    return _compile_jinja_template(template)


@dataclass
class Message:
    role: str
    content: str
    trained: bool
    detail: list[dict] | None  # training_detail: character spans of content with their own flag
    extra: dict  # other keys the template may read (name, tool_calls, ...)


def _role_lookup(spec) -> dict[str, str]:
    roles = spec.roles or DEFAULT_ROLES
    lookup = {}
    for template_role, names in roles.items():
        for name in names:
            lookup[name] = template_role
    return lookup


class ChatTemplate:
    name = "chat_template"

    def looks_like(self, row: dict) -> bool:
        return any(isinstance(row.get(k), list) for k in ("messages", "conversations"))

    def check(self, row, spec) -> list[RowProblem]:
        key = spec.field_messages
        messages = row.get(key)
        if messages is None:
            return [RowProblem(key, "missing")]
        if not isinstance(messages, list):
            return [RowProblem(key, f"must be a list of messages, not {type(messages).__name__}")]
        if not messages:
            return [RowProblem(key, "empty message list")]
        role_key = spec.message_property_mappings.get("role", "role")
        content_key = spec.message_property_mappings.get("content", "content")
        known = _role_lookup(spec)
        problems = []
        for i, msg in enumerate(messages):
            where = f"{key}[{i}]"
            if not isinstance(msg, dict):
                problems.append(RowProblem(where, "must be an object with role and content"))
                continue
            role, content = msg.get(role_key), msg.get(content_key)
            if role is None:
                problems.append(RowProblem(f"{where}.{role_key}", "missing"))
            elif role not in known:
                problems.append(RowProblem(f"{where}.{role_key}",
                                           f"unknown role {role!r}; known: {', '.join(sorted(known))}"))
            if content is None:
                problems.append(RowProblem(f"{where}.{content_key}", "missing"))
            elif not isinstance(content, str):
                problems.append(RowProblem(f"{where}.{content_key}",
                                           f"must be a string, not {type(content).__name__}"))
            elif not content.strip() and known.get(role) != "system":
                problems.append(RowProblem(f"{where}.{content_key}", "empty content"))
            flag = msg.get(spec.message_field_training)
            if flag is not None and not isinstance(flag, bool):
                problems.append(RowProblem(f"{where}.{spec.message_field_training}", "must be true or false"))
        return problems

    def messages(self, row, spec, train_on_inputs: bool) -> list[Message]:
        role_key = spec.message_property_mappings.get("role", "role")
        content_key = spec.message_property_mappings.get("content", "content")
        lookup = _role_lookup(spec)
        out = []
        for msg in row[spec.field_messages]:
            role = lookup.get(msg[role_key], msg[role_key])
            if spec.drop_system_message and role == "system":
                continue
            trained = train_on_inputs or role in spec.roles_to_train
            if isinstance(msg.get(spec.message_field_training), bool):
                trained = msg[spec.message_field_training]
            extra = {k: v for k, v in msg.items() if k not in (
                role_key, content_key, spec.message_field_training, spec.message_field_training_detail)}
            out.append(Message(role, msg[content_key] or "", trained,
                               msg.get(spec.message_field_training_detail), extra))
        return out

    def render(self, row, spec, options) -> Rendered:
        template = _compile(options.chat_template)
        messages = self.messages(row, spec, options.train_on_inputs)
        specials = options.template_kwargs

        def render(contents):
            chat = [{"role": m.role, "content": c, **m.extra} for m, c in zip(messages, contents)]
            return template.render(messages=chat, add_generation_prompt=False, **specials)

        marked = render([f"{_MARK_OPEN}{i}{_MARK_CLOSE}" for i in range(len(messages))])
        text = render([m.content for m in messages])
        regions = _locate_contents(marked, text, [m.content for m in messages])

        spans: list[Span] = []
        notes: list[str] = []
        parts = [f"{m.role} #{i}" for i, m in enumerate(messages)]
        eots = _eot_positions(text, regions, options.eot_tokens)
        policy = spec.eot_policy
        last_trained = max((i for i, m in enumerate(messages) if m.trained), default=None)
        for i, (msg, region) in enumerate(zip(messages, regions)):
            if region is None:
                continue
            start, end = region
            spans.extend(_content_spans(msg, start, end, text, i))
            train_eot = (policy == "all" or (policy == "turn" and msg.trained)
                         or (policy == "last" and i == last_trained))
            if eots[i] is not None:
                spans.append(Span(eots[i][0], eots[i][1], train_eot, i))
            elif train_eot:
                notes.append(
                    f"no end-of-turn token ({', '.join(options.eot_tokens) or 'none set'}) after a {msg.role} "
                    "turn in the rendered template, so none is trained and the model may not learn to stop: "
                    "set eot_tokens to the token that ends a turn in this chat template")
        return Rendered(pieces=[Piece(text, spans=spans, add_special_tokens=False)], parts=parts, notes=notes)


def _content_spans(msg: Message, start: int, end: int, text: str, part: int) -> list[Span]:
    if not msg.detail:
        return [Span(start, end, msg.trained, part)]
    # training_detail offsets index the message's own content; the template may have moved it.
    base = text.find(msg.content, start, end + 1) if msg.content else -1
    base = start if base < 0 else base
    spans = [Span(start, end, False, part)]
    for d in msg.detail:
        lo = base + int(d.get("begin_offset", 0))
        hi = base + int(d.get("end_offset", len(msg.content) - 1)) + 1  # end_offset is inclusive
        spans.append(Span(max(lo, start), min(hi, end), bool(d.get("train", True)), part))
    return spans


def _locate_contents(marked: str, text: str, contents: list[str]) -> list[tuple[int, int] | None]:
    """Character region of each message's content in `text`, or None when the template dropped it."""
    regions: list[tuple[int, int] | None] = [None] * len(contents)
    # Fast path: the template copies contents verbatim, so splicing reproduces the real render.
    pieces, shift, prev = [], 0, 0
    for m in _MARKER_RE.finditer(marked):
        i = int(m.group(1))
        pieces.append(marked[prev:m.start()])
        start = m.start() + shift
        regions[i] = (start, start + len(contents[i]))
        pieces.append(contents[i])
        shift += len(contents[i]) - (m.end() - m.start())
        prev = m.end()
    pieces.append(marked[prev:])
    if "".join(pieces) == text:
        return regions
    # The template transformed some content (trim, escaping, ...): walk the fixed segments instead.
    regions = [None] * len(contents)
    order = list(_MARKER_RE.finditer(marked))
    cursor = 0
    for k, m in enumerate(order):
        seg_start = order[k - 1].end() if k else 0
        segment = marked[seg_start:m.start()]
        at = text.find(segment, cursor)
        if at < 0:
            continue
        content_start = at + len(segment)
        nxt = marked[m.end():order[k + 1].start()] if k + 1 < len(order) else marked[m.end():]
        content_end = text.find(nxt, content_start) if nxt else len(text)
        if content_end < 0:
            content_end = content_start
        regions[int(m.group(1))] = (content_start, content_end)
        cursor = content_end
    return regions


def _eot_positions(text: str, regions, eot_tokens: list[str]) -> list[tuple[int, int] | None]:
    """The first end-of-turn token string after each content, before the next message's content."""
    starts = sorted(r[0] for r in regions if r is not None)
    out: list[tuple[int, int] | None] = []
    for region in regions:
        if region is None:
            out.append(None)
            continue
        end = region[1]
        limit = next((s for s in starts if s >= end and s > region[0]), len(text))
        best = None
        for tok in eot_tokens:
            at = text.find(tok, end, limit)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, at + len(tok))
        out.append(best)
    return out


FORMAT = ChatTemplate()

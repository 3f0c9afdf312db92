"""`type: chat_template`: conversations rendered by a jinja chat template, trained by role.

Trained characters are found without assumptions about any one template: the conversation is
rendered once with a unique marker in place of each message's content (the template's own text is
what remains around the markers) and once for real; splicing the contents into the marked render
must give the real one, else the contents are located between the template's fixed segments. The
end-of-turn token of a message is the first eot token string after its content.
"""

from __future__ import annotations

import difflib
import json
import re
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from training.formats.base import Piece, Rendered, RowProblem, Span
from training.formats.template_analysis import content_is_verbatim, message_fields

TEMPLATES_DIR = Path(__file__).with_name("templates")
# Axolotl's named templates: the vendors' jinja files beside this module (see templates/README.md),
# read when a name is first used. The names are the file names, listed once.
TEMPLATE_NAMES = frozenset(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
SPECIAL_CHOICES = ("tokenizer_default", "jinja")
FALLBACK_PREFIX = "tokenizer_default_fallback_"


@cache
def named_template(name: str) -> str:
    """The jinja text of a named template (KeyError for an unknown name)."""
    if name not in TEMPLATE_NAMES:
        raise KeyError(name)
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


class _NamedTemplates(Mapping):
    """name -> jinja text, each file read on first use."""

    def __getitem__(self, name: str) -> str:
        return named_template(name)

    def __iter__(self):
        return iter(sorted(TEMPLATE_NAMES))

    def __len__(self) -> int:
        return len(TEMPLATE_NAMES)


NAMED_TEMPLATES: Mapping[str, str] = _NamedTemplates()


def __getattr__(name: str) -> str:  # CHATML, LLAMA3, ...: the named templates as constants
    if name.isupper() and name.lower() in TEMPLATE_NAMES:
        return named_template(name.lower())
    raise AttributeError(name)


def check_template_name(value: str | None) -> str | None:
    """A `chat_template` value as config validation accepts it: None, tokenizer_default, jinja, a
    named template, or tokenizer_default_fallback_<named template>. Raises ValueError with the
    closest names otherwise."""
    if value is None or value in SPECIAL_CHOICES or value in TEMPLATE_NAMES:
        return value
    if value.startswith(FALLBACK_PREFIX):
        fallback = value.removeprefix(FALLBACK_PREFIX)
        if fallback in TEMPLATE_NAMES:
            return value
        close = difflib.get_close_matches(fallback, TEMPLATE_NAMES, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(FALLBACK_PREFIX + c for c in close)}?)" if close else ""
        raise ValueError(
            f"unknown chat_template {value!r}{hint}; the fallback must be a named template: "
            f"{', '.join(sorted(TEMPLATE_NAMES))}"
        )
    close = difflib.get_close_matches(value, [*SPECIAL_CHOICES, *TEMPLATE_NAMES], n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(
        f"unknown chat_template {value!r}{hint}; choose tokenizer_default, jinja (with chat_template_jinja), "
        f"tokenizer_default_fallback_<name> or a named template: {', '.join(sorted(TEMPLATE_NAMES))}"
    )


def read_template_jinja(value: str, base_dir: Path | None = None) -> str:
    """`chat_template_jinja` is the template text, or (as in axolotl) the path of a file holding it:
    a value naming an existing file, or ending in .jinja/.j2, is read; a relative path is looked up
    as given, then beside the config (`base_dir`)."""
    if "\n" in value or "{" in value:
        return value  # template text: a path has neither
    candidates = [Path(value).expanduser()]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.append(Path(base_dir) / candidates[0])
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    if value.strip().endswith((".jinja", ".j2")):
        raise ValueError(f"chat_template_jinja: template file {value!r} not found")
    return value


# Axolotl's default role names: the template's role -> names a dataset may use for it.
DEFAULT_ROLES = {
    "user": ["human", "user"],
    "assistant": ["gpt", "assistant"],
    "system": ["system"],
    "tool": ["tool"],
}

STANDARD_ROLES = {"system", "user", "assistant", "tool"}

_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"  # private-use characters: never in real text, kept by trim
_MARKER_RE = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


def detect_layout(row: dict) -> dict:
    """The dataset options (axolotl names) that read this row's conversation: where the messages
    are (`messages` or ShareGPT's `conversations`) and their role/content keys (`from`/`value`).
    Empty for the default layout."""
    key = next((k for k in ("messages", "conversations") if isinstance(row.get(k), list)), None)
    if key is None:
        return {}
    options: dict = {} if key == "messages" else {"field_messages": key}
    first = next((m for m in row[key] if isinstance(m, dict)), None)
    if first is not None and "role" not in first and "from" in first:
        options["message_property_mappings"] = {"role": "from", "content": "value"}
    return options


def resolve_chat_template(
    name: str | None, jinja: str | None, tokenizer_template: str | None, base_dir: Path | None = None
) -> str:
    """Axolotl's `chat_template` names -> jinja text. Raises ValueError with the fix."""
    name = name or "tokenizer_default"
    if jinja and name in ("jinja", "tokenizer_default"):
        return read_template_jinja(jinja, base_dir)
    if name == "jinja":
        raise ValueError("chat_template: jinja needs chat_template_jinja")
    check_template_name(name)
    if name == "tokenizer_default":
        if tokenizer_template:
            return tokenizer_template
        raise ValueError(
            "the tokenizer has no chat template; set chat_template: chatml (or another name) or chat_template_jinja"
        )
    if name.startswith(FALLBACK_PREFIX):
        return tokenizer_template or named_template(name.removeprefix(FALLBACK_PREFIX))
    return named_template(name)


def check_template(template: str) -> None:
    """Raises ValueError naming the line when the jinja text doesn't parse. Also works out what the
    encoder reads off the template (template_facts), so that processes forked later inherit it."""
    import jinja2

    try:
        template_facts(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the chat template doesn't parse: line {exc.lineno}: {exc.message}") from None


@cache
def template_facts(template: str) -> tuple:
    """(compiled template, whether it copies contents verbatim, the message keys it reads): once per
    template text, not once per dataset entry (Gemma 4's: ~55 ms to compile, ~45 ms to analyse)."""
    compiled = _compile(template)
    return compiled, content_is_verbatim(compiled.environment, template), message_fields(compiled.environment, template)


def _compile(template: str):
    """The compiled template, in the environment transformers' apply_chat_template gives it (our own
    copy: importing transformers' helper cost more than encoding 20k rows; see jinja_env.py)."""
    from training.formats.jinja_env import compile_template

    return compile_template(template)


@dataclass
class Message:
    role: str
    content: str
    trained: bool
    detail: list[dict] | None  # training_detail: character spans of content with their own flag
    extra: dict  # other keys the template may read (name, tool_calls, reasoning_content, ...)
    calls: bool = False  # has tool_calls: the turn's rendered calls train with its content
    located: bool | None = None  # by_diff: whether the turn's rendered text was found (None: by content)
    thinking: str | None = None  # the reasoning trace the template may print (also in extra)


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
        problems = []
        system = row.get(spec.field_system)
        if system is not None and not isinstance(system, str):
            problems.append(RowProblem(spec.field_system, "must be a string"))
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            problems.append(RowProblem("tools", "must be a list of tool definitions"))
        for i, msg in enumerate(messages):
            where = f"{key}[{i}]"
            if not isinstance(msg, dict):
                problems.append(RowProblem(where, "must be an object with role and content"))
                continue
            role, content = msg.get(role_key), msg.get(content_key)
            if role is None:
                problems.append(RowProblem(f"{where}.{role_key}", "missing"))
            elif not isinstance(role, str):
                problems.append(RowProblem(f"{where}.{role_key}", f"must be a string, not {type(role).__name__}"))
            # A role outside `roles` reaches the template as it is (as in axolotl): the template says
            # whether it renders it, per row (see ChatTemplate.render).
            calls = msg.get("tool_calls")
            if calls is not None and not (isinstance(calls, list) and all(isinstance(c, dict) for c in calls)):
                problems.append(RowProblem(f"{where}.tool_calls", "must be a list of calls (objects)"))
            if calls and content in (None, ""):
                pass  # an assistant turn that only calls tools: the calls are what it says
            elif content is None:
                problems.append(RowProblem(f"{where}.{content_key}", "missing"))
            elif isinstance(content, list):
                bad = [j for j, p in enumerate(content) if not (isinstance(p, dict) and isinstance(p.get("text"), str))]
                if bad:
                    problems.append(
                        RowProblem(f"{where}.{content_key}[{bad[0]}]", "a content part needs a string `text`")
                    )
            elif not isinstance(content, str):
                problems.append(RowProblem(f"{where}.{content_key}", f"must be a string, not {type(content).__name__}"))
            # An empty content is rendered and trains nothing of its own, as in axolotl (a note says so).
            flag = msg.get(spec.message_field_training)
            if flag is not None and not isinstance(flag, bool):
                problems.append(RowProblem(f"{where}.{spec.message_field_training}", "must be true or false"))
            detail = msg.get(spec.message_field_training_detail)
            if detail is not None and not (
                isinstance(detail, list)
                and all(
                    isinstance(d, dict)
                    and isinstance(d.get("begin_offset"), int)
                    and isinstance(d.get("end_offset"), int)
                    for d in detail
                )
            ):
                problems.append(
                    RowProblem(
                        f"{where}.{spec.message_field_training_detail}",
                        "must be a list of {begin_offset, end_offset, train}",
                    )
                )
        return problems

    def messages(self, row, spec, train_on_inputs: bool) -> list[Message]:
        return _plan(spec, train_on_inputs, None).messages(row)

    def render_valid(self, row, spec, options) -> Rendered | None:
        """The common row checked and rendered in one pass: a list of plain {role, content} messages
        with known roles and non-blank text, on a template that copies contents verbatim. None for
        anything else, which takes the general path (check, then render) to the same result."""
        plan = _plan(spec, options.train_on_inputs, options)
        if not plan.fast or type(row) is not dict:
            return None
        raw = row.get(plan.field)
        if type(raw) is not list or not raw or row.get(plan.system_key) is not None or row.get("tools"):
            return None
        role_key, content_key, simple = plan.role_key, plan.content_key, plan.simple_roles
        names, contents = [], []
        for msg in raw:
            if type(msg) is not dict or len(msg) != 2:
                return None
            name, content = msg.get(role_key), msg.get(content_key)
            # not content.isspace(): blank as content.strip() would say, without a copy of the text
            if (
                type(name) is not str
                or name not in simple
                or type(content) is not str
                or not content
                or content.isspace()
            ):
                return None
            names.append(name)
            contents.append(content)
        shape = tuple(names)
        compiled = plan.shapes.get(shape)
        if compiled is None:
            compiled = plan.shapes[shape] = self._compile_shape(row, spec, options, plan) or False
        return compiled.render(contents) if compiled else None

    def _compile_shape(self, row, spec, options, plan) -> _RowShape | None:
        """What every row with these roles shares: the template text around the contents, where the
        end-of-turn tokens are, and which spans train. Built from one real render of `row`."""
        try:
            self.render(row, spec, options)  # renders the marked skeleton of this shape, if not cached
        except Exception:
            return None  # the template refuses this shape (raise_exception): the general path reports it
        messages = plan.messages(row)
        marked = plan.skeletons.get(tuple((m.role, False, "") for m in messages))
        if marked is None or len(plan.shapes) > 4096:
            return None
        skeleton = _Skeleton(marked, options.eot_tokens, options.eos_token)
        if len(set(skeleton.order)) != len(skeleton.order):
            return None  # a template that prints a content twice: the general path handles it
        ends = [None] * len(messages)
        for k, i in enumerate(skeleton.order):
            ends[i] = skeleton.end_offsets[k]
        flags, notes = _end_flags(messages, ends, plan, options)
        steps = []
        for k, i in enumerate(skeleton.order):
            literal = skeleton.literals[k + 1]
            marks = _end_marks(ends[i], flags[i])
            steps.append((i, literal, marks, messages[i].trained))
        return _RowShape(skeleton.literals[0], steps, [f"{m.role} #{i}" for i, m in enumerate(messages)], notes)

    def render(self, row, spec, options) -> Rendered:
        plan = _plan(spec, options.train_on_inputs, options)
        try:
            return self._render(row, plan.messages(row), plan, options)
        except Exception as exc:
            # Axolotl passes a template only the message keys it reads off `message`; some templates
            # need others (Gemma 4 finds a tool's name by tool_call_id) and fail on every such row,
            # which fails axolotl's whole dataset. We drop the row, saying which keys it lacked:
            # rendering it with them would train what axolotl never does (Gemma 4 puts the tool's
            # response inside the model's turn).
            given = plan.messages(row)
            every = plan.messages(row, every_field=True)
            missing = sorted({k for m, g in zip(every, given) for k in m.extra if k not in g.extra})
            if not missing:
                raise
            try:
                self._render(row, every, plan, options)
            except Exception:
                raise exc from None
            raise ValueError(
                f"{exc}: the template needs message keys axolotl doesn't pass it ({', '.join(missing)}); "
                "axolotl fails on this row too"
            ) from None

    def _render(self, row, messages, plan, options) -> Rendered:
        if any(m.extra for m in messages):
            return self._render_by_diff(row, messages, plan, options)
        contents = [m.content for m in messages]
        # The marked render depends on the roles and extra fields, rarely on contents: reuse it
        # across rows. When the template provably copies contents verbatim, splicing them into it
        # *is* the render; otherwise render for real and trust the splice only if it matches.
        tools = row.get("tools") or None  # axolotl passes the row's tools to the template when there are any
        key = tuple(
            (m.role, not m.content, json.dumps(m.extra, sort_keys=True, default=str) if m.extra else "")
            for m in messages
        ) + ((json.dumps(tools, sort_keys=True, default=str),) if tools else ())
        kwargs = {**options.template_kwargs, "tools": tools} if tools else options.template_kwargs
        marked = plan.skeletons.get(key)
        if plan.verbatim and marked is not None:
            skeleton = plan.parsed.get(key) or plan.parsed.setdefault(
                key, _Skeleton(marked, options.eot_tokens, options.eos_token)
            )
            return self._spans(messages, *skeleton.splice(contents), plan, options)
        chat = [
            {"role": m.role, "content": m.content, **m.extra} if m.extra else {"role": m.role, "content": m.content}
            for m in messages
        ]
        text = plan.template.render(messages=chat, add_generation_prompt=False, **kwargs)
        regions = _splice(marked, text, contents) if marked is not None else None
        if regions is None:
            for i, c in enumerate(chat):
                c["content"] = f"{_MARK_OPEN}{i}{_MARK_CLOSE}"
            marked = plan.template.render(messages=chat, add_generation_prompt=False, **kwargs)
            if len(plan.skeletons) > 4096:
                plan.skeletons.clear()
            plan.skeletons[key] = marked
            regions = _splice(marked, text, contents)
            if regions is None:  # the template changed a content (trim) or branched on one: as axolotl
                return self._render_by_diff(row, messages, plan, options, text)
        ends = _end_positions(text, regions, options.eot_tokens, options.eos_token)
        return self._spans(messages, text, regions, ends, plan, options)

    def _render_by_diff(self, row, messages, plan, options, text: str | None = None) -> Rendered:
        """A row whose messages carry more than role and content (a reasoning trace, tool calls, a
        name, ...): as axolotl, a turn is what changes in the render when the turn is replaced by
        one with only its role and a placeholder content. That takes in what the template prints
        of the turn's other fields (its thinking, its calls), where the template prints them."""
        tools = row.get("tools") or None
        kwargs = {**options.template_kwargs, "tools": tools} if tools else options.template_kwargs
        chat = [
            {"role": m.role, "content": m.content, **m.extra} if m.extra else {"role": m.role, "content": m.content}
            for m in messages
        ]
        if text is None:
            text = plan.template.render(messages=chat, add_generation_prompt=False, **kwargs)
        any_all = "all" in (plan.eot_policy, plan.eos_policy)
        regions: list[tuple[int, int] | None] = [None] * len(messages)
        for i, m in enumerate(messages):
            if m.trained or any_all:
                regions[i] = _turn_region(plan.template, chat, i, text, kwargs)
            m.located = regions[i] is not None
        ends = _end_positions(text, regions, options.eot_tokens, options.eos_token)
        return self._spans(messages, text, regions, ends, plan, options, exact=True)

    def _spans(self, messages, text, regions, ends, plan, options, exact: bool = False) -> Rendered:
        """Each message's content span, then its end-of-turn and eos tokens' spans (merged into the
        content's span when they touch and agree: the same tokens, fewer to map). Hot: once per row."""
        spans: list[Span] = []
        parts = [f"{m.role} #{i}" for i, m in enumerate(messages)]
        flags, notes = _end_flags(messages, ends, plan, options)
        for i, msg in enumerate(messages):
            region = regions[i]
            if region is None:
                continue
            start, end = region
            at = text.find(msg.thinking, start, end) if msg.thinking and exact else -1
            if at >= 0:  # the trace as a part of its own, for the preview; it trains as its turn does
                spans += [Span(start, at, msg.trained, i), Span(at, at + len(msg.thinking), msg.trained, len(parts))]
                parts.append(f"{msg.role} #{i} thinking")
                start = at + len(msg.thinking)
            marks = _end_marks(ends[i], flags[i]) if msg.content or msg.calls or exact else []
            if msg.calls and marks and not exact:  # axolotl trains the turn's whole text: content and calls
                shift = marks[0][0]
                end += shift
                marks = [(off - shift, length, flag) for off, length, flag in marks]
            if msg.detail:
                spans += _detail_spans(msg, start, end, text, i)
                spans += [Span(end + off, end + off + length, flag, i) for off, length, flag in marks]
                continue
            current = Span(start, end, msg.trained, i)
            for off, length, flag in marks:
                if end + off == current.end and flag == current.trained:
                    current = Span(current.start, end + off + length, flag, i)
                else:
                    spans.append(current)
                    current = Span(end + off, end + off + length, flag, i)
            spans.append(current)
        notes += [
            f"an empty {m.role} turn is rendered and trains nothing of its own"
            for m in messages
            if m.trained and not m.content and not m.calls and not m.thinking
        ]
        return Rendered(pieces=[Piece(text, spans=spans, add_special_tokens=False)], parts=parts, notes=notes)


def _end_flags(messages, ends, plan, options) -> tuple[list[tuple[bool, bool]], list[str]]:
    """Axolotl's two passes over the turns: per message, whether its end-of-turn token (eot_tokens,
    policy train_on_eot) and its eos token (policy train_on_eos) train. Labels are only ever added,
    so where the two are one token it trains if either pass says so. Only turns with content are
    looked at, and untrained ones only when a policy is `all`; `last` is the last token found among
    them. `ends[i]`: (eot offset, eos offset) after the content, each (offset, length) or None."""
    any_all = "all" in (plan.eot_policy, plan.eos_policy)
    processed = [
        i
        for i, m in enumerate(messages)
        if ends[i] is not None
        and (m.located if m.located is not None else (m.content or m.calls))
        and (m.trained or any_all)
    ]
    flags = [[False, False] for _ in messages]
    missing: set[int] = set()
    for k, policy in enumerate((plan.eot_policy, plan.eos_policy)):
        has = [i for i in processed if ends[i][k] is not None]
        if policy == "all":
            wanted = processed
        elif policy == "turn":
            wanted = [i for i in processed if messages[i].trained]
        elif policy == "last":
            wanted = processed[-1:]
            has = has[-1:]
        else:
            continue
        for i in has if policy == "last" else wanted:
            flags[i][k] = True
        if k == 0 or options.eos_token not in options.eot_tokens:
            missing |= {i for i in wanted if ends[i][k] is None}
    notes = [_no_eot_note(messages[i].role, options.eot_tokens) for i in sorted(missing)]
    return [tuple(f) for f in flags], notes


def _end_marks(end, flags) -> list[tuple[int, int, bool]]:
    """(offset after the content, length, trained) of a turn's end tokens, in text order; one mark
    where the eot and the eos are the same token."""
    if end is None:
        return []
    (eot, eos), (f_eot, f_eos) = end, flags
    if eot is not None and eos is not None and eot == eos:
        return [(eot[0], eot[1], f_eot or f_eos)]
    return sorted((pos[0], pos[1], flag) for pos, flag in ((eot, f_eot), (eos, f_eos)) if pos is not None)


def _no_eot_note(role: str, eot_tokens: list[str]) -> str:
    return (
        f"no end-of-turn token ({', '.join(eot_tokens) or 'none set'}) after a {role} "
        "turn in the rendered template, so none is trained and the model may not learn to stop: "
        "set eot_tokens to the token that ends a turn in this chat template"
    )


class _RowShape:
    """A compiled row shape (see ChatTemplate.render_valid): rendering a row is string joins and one
    span per turn (two when its end-of-turn token is apart or trained differently)."""

    __slots__ = ("head", "steps", "parts", "notes")

    def __init__(self, head: str, steps: list, parts: list[str], notes: list[str]):
        """steps: per content in render order (message index, literal after it, its end marks, trained)."""
        self.head, self.parts, self.notes = head, parts, notes
        # Where a turn's spans start and end, relative to its content, is the same for every row:
        # worked out here once. The first span runs from the content's start to `first_end` past its
        # end; the others are (start, end, trained) past the content's end. Span by tuple.__new__:
        # the same tuple as Span(...), without NamedTuple's Python-level __new__ (hot: once a turn).
        self.steps = []
        for i, literal, marks, trained in steps:
            first_end, current, rest = 0, None, []
            for off, length, flag in marks:
                if current is None and off == first_end and flag == trained:
                    first_end = off + length
                elif current is not None and off == current[1] and flag == current[2]:
                    current[1] = off + length
                else:
                    current = [off, off + length, flag]
                    rest.append(current)
            self.steps.append((i, literal, len(literal), first_end, trained, [tuple(r) for r in rest]))

    def render(self, contents: list[str]) -> Rendered:
        out = [self.head]
        pos = len(self.head)
        spans = []
        new = tuple.__new__
        for i, literal, literal_len, first_end, trained, rest in self.steps:
            content = contents[i]
            end = pos + len(content)
            spans.append(new(Span, (pos, end + first_end, trained, i, None)))
            for lo, hi, flag in rest:
                spans.append(new(Span, (end + lo, end + hi, flag, i, None)))
            out.append(content)
            out.append(literal)
            pos = end + literal_len
        return Rendered(pieces=[Piece("".join(out), spans=spans)], parts=self.parts, notes=self.notes)


class _Plan:
    """What a dataset entry's options mean, worked out once instead of per row."""

    def __init__(self, spec, train_on_inputs: bool, template_text: str | None):
        self.role_key = spec.message_property_mappings.get("role", "role")
        self.content_key = spec.message_property_mappings.get("content", "content")
        self.lookup = _role_lookup(spec)
        self.field = spec.field_messages
        self.system_key = spec.field_system
        self.train_all = train_on_inputs
        self.roles_to_train = {self.lookup.get(r, r) for r in spec.roles_to_train}
        self.training_key = spec.message_field_training
        self.detail_key = spec.message_field_training_detail
        self.drop_system = spec.drop_system_message
        self.reserved = {self.role_key, self.content_key, self.training_key, self.detail_key}
        self.thinking_field = spec.field_thinking  # the row's key for a reasoning trace
        self.thinking_key = spec.template_thinking_key  # the template's
        self.split_thinking = spec.split_thinking
        # As axolotl: the trace reaches the template under its key only with the default mappings.
        user_mapped = {"message_property_mappings", "message_field_role", "message_field_content"}
        self.maps_thinking = not (user_mapped & spec.model_fields_set)
        self.eot_policy = spec.eot_policy  # train_on_eot, defaulting to train_on_eos
        self.eos_policy = spec.train_on_eos
        # fields: the message keys that reach the template besides role and content (axolotl's rule)
        facts = template_facts(template_text) if template_text else (None, False, None)
        self.template, self.verbatim, self.fields = facts
        self.skeletons: dict = {}
        self.parsed: dict = {}
        self.fast = self.verbatim and not self.drop_system  # render_valid may compile row shapes
        self.simple_roles = set(self.lookup) | set(self.lookup.values()) | STANDARD_ROLES
        self.shapes: dict = {}

    def messages(self, row, every_field: bool = False) -> list[Message]:
        raw = row[self.field]
        out = []
        system = row.get(self.system_key)
        if isinstance(system, str) and not (raw and self.lookup.get(raw[0].get(self.role_key)) == "system"):
            # Axolotl: a row-level system prompt becomes the first turn, unless one is already there.
            raw = [{self.role_key: "system", self.content_key: system}] + raw
        for position, msg in enumerate(raw):
            name = msg[self.role_key]
            role = self.lookup.get(name, name)
            if self.drop_system and role == "system" and position == 0:
                continue  # axolotl drops the leading system turn (the row-level prompt, if any), not later ones
            content, detail = msg[self.content_key] or "", msg.get(self.detail_key)
            if isinstance(content, list):
                content, detail = _join_parts(content, detail)
            flag = msg.get(self.training_key)
            if isinstance(flag, bool):
                trained = flag
            elif detail is not None:
                trained = bool(detail)  # an empty detail list trains nothing of the turn
            else:
                trained = self.train_all or role in self.roles_to_train
            extra = {k: v for k, v in msg.items() if k not in self.reserved and v is not None} if len(msg) > 2 else {}
            if extra:
                thinking = extra.get(self.thinking_field) if self.maps_thinking else None
                if self.fields is not None and not every_field:
                    extra = {k: v for k, v in extra.items() if k in self.fields}
                if thinking is not None:
                    extra[self.thinking_key] = thinking
            calls = bool(extra.get("tool_calls"))
            if calls:
                extra["tool_calls"] = [_parsed_arguments(c) for c in extra["tool_calls"]]
            if self.split_thinking and role == "assistant" and isinstance(content, str):
                content, thought = split_thinking(content)
                if thought is not None:
                    extra[self.thinking_key] = thought
            thinking = extra.get(self.thinking_key)
            out.append(
                Message(
                    role,
                    content,
                    trained,
                    detail if trained else None,
                    extra,
                    calls,
                    thinking=thinking if isinstance(thinking, str) and thinking else None,
                )
            )
        return out


# What split_thinking takes out of an assistant's content, as axolotl: the first pair found (in this
# order) is the trace; a solution pair in the rest, if any, is the content.
_THINKING_PAIRS = (
    ("<think>", "</think>"),
    ("<reasoning>", "</reasoning>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
)
_SOLUTION_PAIR = ("<|begin_of_solution|>", "<|end_of_solution|>")


def split_thinking(content: str) -> tuple[str, str | None]:
    """(content, reasoning trace or None) of an assistant content with its thinking inline."""
    for open_tag, close_tag in _THINKING_PAIRS:
        if open_tag in content and close_tag in content:
            start, end = content.find(open_tag), content.find(close_tag)
            thought = content[start + len(open_tag) : end].strip()
            rest = content[end + len(close_tag) :].lstrip()
            begin, finish = _SOLUTION_PAIR
            if begin in rest and finish in rest:
                rest = rest[rest.find(begin) + len(begin) : rest.find(finish)].strip()
            return rest, thought
    return content, None


def _parsed_arguments(call: dict) -> dict:
    """As axolotl: a call's `arguments` given as a JSON string reaches the template as an object."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except ValueError:
            return call
    return call


def _join_parts(parts: list[dict], detail):
    """Content given as parts: one string, and per-part training flags as a training_detail."""
    text = "".join(p["text"] for p in parts)
    if detail is None and any("train" in p or "weight" in p for p in parts):
        detail, offset = [], 0
        for p in parts:
            train = p["train"] if "train" in p else (p.get("weight", 1) > 0)
            if p["text"]:
                detail.append({"begin_offset": offset, "end_offset": offset + len(p["text"]) - 1, "train": train})
            offset += len(p["text"])
    return text, detail


def _plan(spec, train_on_inputs: bool, options) -> _Plan:
    if options is None:
        return _Plan(spec, train_on_inputs, None)
    key = ("chat_template_plan", id(spec), train_on_inputs)
    plan = options.skeletons.get(key)
    if plan is None:
        plan = options.skeletons[key] = _Plan(spec, train_on_inputs, options.chat_template)
    return plan


def _detail_spans(msg: Message, start: int, end: int, text: str, part: int) -> list[Span]:
    """training_detail: inclusive character offsets into the message's content, snapped to tokens as
    axolotl does (the encoder applies the rule: see `snap` in training.encode)."""
    base = text.find(msg.content, start, end + 1) if msg.content else -1
    base = start if base < 0 else base
    spans = [Span(start, end, False, part)]
    for d in msg.detail:
        if not d.get("train", True):
            continue  # a train: false detail never masks what another detail trains
        lo, hi = base + int(d["begin_offset"]), base + int(d["end_offset"]) + 1
        spans.append(Span(max(lo, start), min(hi, end), True, part, (base, base + len(msg.content))))
    return spans


class _Skeleton:
    """A marked render taken apart once: the literal text around each content, and where the first
    end-of-turn token sits in the literal after it. Splicing a row's contents is then string joins."""

    def __init__(self, marked: str, eot_tokens: list[str], eos_token: str | None):
        self.literals, self.order = [], []
        prev = 0
        for m in _MARKER_RE.finditer(marked):
            self.literals.append(marked[prev : m.start()])
            self.order.append(int(m.group(1)))
            prev = m.end()
        self.literals.append(marked[prev:])
        # Per content (in render order): where its end-of-turn and eos tokens sit in the literal
        # after it, each (offset after the content's end, length) or None.
        self.end_offsets = [
            (
                _near(literal, 0, _first(literal, eot_tokens), eot_tokens),
                _near(literal, 0, _first(literal, [eos_token] if eos_token else []), eot_tokens),
            )
            for literal in self.literals[1:]
        ]

    def splice(self, contents: list[str]):
        n = len(contents)
        regions: list[tuple[int, int] | None] = [None] * n
        ends: list = [None] * n
        out = [self.literals[0]]
        length = len(self.literals[0])
        for k, i in enumerate(self.order):
            content = contents[i]
            end = length + len(content)
            regions[i] = (length, end)
            ends[i] = self.end_offsets[k]
            literal = self.literals[k + 1]
            out.append(content)
            out.append(literal)
            length = end + len(literal)
        return "".join(out), regions, ends


def _first(text: str, tokens: list[str], start: int = 0, stop: int | None = None) -> tuple[int, int] | None:
    """(offset from `start`, length) of the first of `tokens` in text[start:stop], or None."""
    found = [(at, len(t)) for t in tokens if (at := text.find(t, start, len(text) if stop is None else stop)) >= 0]
    if not found:
        return None
    at, length = min(found)
    return at - start, length


# Axolotl's placeholders: their first and last characters differ, so whatever a template glues to
# one side of a placeholder, the other placeholder shows it (the widest of the two diffs is the turn).
_SENTINELS = ("[[dummy_message]]", "zzdummymessagezz")
_SENTINEL_CHARS = {s: frozenset(s) for s in _SENTINELS}


def _turn_region(template, chat: list[dict], i: int, text: str, kwargs: dict) -> tuple[int, int] | None:
    """Characters of `text` that change when message i is only its role and a placeholder content;
    None when nothing changes (an empty turn). ValueError when the template refuses that turn."""
    starts, ends = [], []
    for sentinel in _SENTINELS:
        dummy = [*chat[:i], {"role": chat[i]["role"], "content": sentinel}, *chat[i + 1 :]]
        try:
            other = template.render(messages=dummy, add_generation_prompt=False, **kwargs)
        except Exception as exc:
            # Mistral's templates refuse an assistant turn without its tool calls where one with
            # them is fine: axolotl fails there too, so the row can't be trained as axolotl does.
            raise ValueError(
                f"the template refuses turn {i} reduced to its role and content, which is how axolotl "
                f"finds what a turn trains ({exc}); axolotl fails on this row too"
            ) from None
        limit = min(len(text), len(other))
        start = _common_prefix(text, other, limit)
        suffix = _common_prefix(text[::-1], other[::-1], limit - start)
        starts.append(start)
        ends.append(len(text) - suffix)
        # The diff can only have stopped short inside the turn on a character of the placeholder;
        # when the characters at its edges aren't any, the second placeholder can't widen it.
        chars = _SENTINEL_CHARS[sentinel]
        if (start == 0 or text[start - 1] not in chars) and (ends[-1] >= len(text) or text[ends[-1]] not in chars):
            break
    start, end = min(starts), max(ends)
    return (start, end) if end > start else None


def _common_prefix(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit` (halving: comparisons stay in C)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _splice(marked: str, text: str, contents: list[str]) -> list[tuple[int, int] | None] | None:
    """Content regions if splicing the contents into the marked render gives exactly `text`, else None."""
    regions: list[tuple[int, int] | None] = [None] * len(contents)
    pieces, shift, prev = [], 0, 0
    for m in _MARKER_RE.finditer(marked):
        i = int(m.group(1))
        pieces.append(marked[prev : m.start()])
        start = m.start() + shift
        regions[i] = (start, start + len(contents[i]))
        pieces.append(contents[i])
        shift += len(contents[i]) - (m.end() - m.start())
        prev = m.end()
    pieces.append(marked[prev:])
    return regions if "".join(pieces) == text else None


def _end_positions(text: str, regions, eot_tokens: list[str], eos_token: str | None) -> list:
    """Per content: (its end-of-turn token, its eos token), each the first after the content and
    before the next content in the text (a template may print messages out of order, e.g. the system
    prompt first), as (offset after the content's end, length), or None."""
    starts = sorted((region[0], i) for i, region in enumerate(regions) if region is not None)
    eos = [eos_token] if eos_token else []
    out: list = []
    for i, region in enumerate(regions):
        if region is None:
            out.append(None)
            continue
        end = region[1]
        following = bisect_left(starts, (end, -1))
        if following < len(starts) and starts[following][1] == i:  # an empty content starts where it ends
            following += 1
        limit = starts[following][0] if following < len(starts) else len(text)
        eot_at, eos_at = _first(text, eot_tokens, end, limit), _first(text, eos, end, limit)
        out.append((_near(text, end, eot_at, eot_tokens), _near(text, end, eos_at, eot_tokens)))
    return out


# Axolotl takes an end token only within 3 tokens of the turn's end. The format sees text, not
# tokens, so it counts what a BPE mostly keeps whole: words, whitespace runs, single punctuation,
# an end token as one, and another tag (<|...|>, [...]) as two, as a tokenizer without it splits it.
_GAP_PIECES = re.compile(r"<[^<>\s]{1,40}>|\[[^\[\]\s]{1,40}\]|\s+|\w+|[^\w\s]")


def _near(text: str, end: int, found: tuple[int, int] | None, end_tokens) -> tuple[int, int] | None:
    if found is None or found[0] == 0:
        return found
    gap = text[end : end + found[0]]
    if len(gap) > 64:
        return None
    pieces = sum(1 if p in end_tokens or p[0] not in "<[" or len(p) == 1 else 2 for p in _GAP_PIECES.findall(gap))
    return found if pieces <= 3 else None


FORMAT = ChatTemplate()

"""Reads a jinja chat template (without running it) to tell whether message contents are only ever
copied verbatim into the output. Then a render with placeholder contents, spliced, equals the real
render for every row with the same roles, and the encoder can skip rendering each row.

Conservative: anything it does not understand (filters on content, content in a condition or a
`set`, a message passed to a filter or call) answers False, and the encoder renders every row.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import nodes

_SAFE_FILTERS_ON_MESSAGES = {"length", "count"}
_MESSAGE_RETURNING_FILTERS = {"first", "last", "reverse", "list"}


@lru_cache(maxsize=32)
def _parse(environment, source: str):
    """The template's syntax tree, parsed once for both analyses (Gemma 4's: ~20 ms a parse). Read only."""
    return environment.parse(source)


def content_is_verbatim(environment, source: str) -> bool:
    try:
        tree = _parse(environment, source)
    except Exception:
        return False
    parents: dict[int, nodes.Node] = {}

    def link(node):
        for child in node.iter_child_nodes():
            parents[id(child)] = node
            link(child)

    link(tree)
    names = {"messages"}
    # Names bound to messages: loop targets over them and `set` aliases (to a fixpoint).
    changed = True
    while changed:
        changed = False
        for node in tree.find_all((nodes.For, nodes.Assign)):
            source_expr = node.iter if isinstance(node, nodes.For) else node.node
            if _mentions(source_expr, names):
                for target in (
                    node.target.find_all(nodes.Name) if not isinstance(node.target, nodes.Name) else [node.target]
                ):
                    if target.name not in names:
                        names.add(target.name)
                        changed = True
    for name in tree.find_all(nodes.Name):
        if name.name in names and name.ctx == "load" and not _use_is_safe(name, parents):
            return False
    return True


def _mentions(expr, names) -> bool:
    return any(n.name in names for n in ([expr] if isinstance(expr, nodes.Name) else expr.find_all(nodes.Name)))


def _use_is_safe(node, parents) -> bool:
    """Follow a message (or list of messages) expression up to where it is consumed."""
    parent = parents.get(id(node))
    if isinstance(parent, (nodes.Getitem, nodes.Getattr)) and parent.node is node:
        key = (
            parent.attr
            if isinstance(parent, nodes.Getattr)
            else (parent.arg.value if isinstance(parent.arg, nodes.Const) else None)
        )
        if key == "content":
            return _reaches_output_verbatim(parent, parents)
        if isinstance(key, str):
            return True  # role, name, tool_calls...: part of the cache key, not of the content
        return _use_is_safe(parent, parents)  # messages[0], messages[1:]: still messages
    if isinstance(parent, nodes.For) and parent.iter is node:
        return True
    if isinstance(parent, nodes.Assign) and parent.node is node:
        return True  # the alias is itself checked as a message name
    if isinstance(parent, nodes.Filter) and parent.node is node:
        if parent.name in _SAFE_FILTERS_ON_MESSAGES:
            return True
        if parent.name in _MESSAGE_RETURNING_FILTERS:
            return _use_is_safe(parent, parents)
    return False


def _reaches_output_verbatim(node, parents) -> bool:
    """Content may only be concatenated (+, ~) on its way into the output."""
    while True:
        parent = parents.get(id(node))
        if isinstance(parent, nodes.Output):
            return True
        if not isinstance(parent, (nodes.Add, nodes.Concat)):
            return False
        node = parent


def message_fields(environment, source: str) -> frozenset[str] | None:
    """The message keys axolotl 0.21 lets reach a chat template besides role and content: every
    name read off a variable called `message`, at any depth (`message.tool_calls`,
    `message['name']`, and also method names such as `message.content.startswith`). Axolotl drops
    the other keys of a message before rendering, so a template that reads its messages under
    another name (`msg`) never sees their tool calls there. None when the template doesn't parse."""
    try:
        tree = _parse(environment, source)
    except Exception:
        return None
    fields: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        while isinstance(base, (nodes.Getattr, nodes.Getitem)):
            base = base.node
        if not (isinstance(base, nodes.Name) and base.name == "message"):
            continue
        if isinstance(node, nodes.Getattr):
            fields.add(node.attr)
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            fields.add(node.arg.value)
    return frozenset(fields)

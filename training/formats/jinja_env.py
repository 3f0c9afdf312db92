"""The jinja environment chat templates run in: the one transformers' `apply_chat_template` builds.

Importing transformers' helper (`transformers.utils.chat_template_utils`) took ~0.4 s of a ~2 s
`trainyard preprocess` (it imports transformers, numpy, huggingface_hub, httpx), for a dozen lines of
environment. This is those lines, kept to transformers 5's `_cached_compile_jinja_template`:

- `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with the `loopcontrols`
  extension (`break`, `continue`) and the `{% generation %}...{% endgeneration %}` tag (it renders
  its body; transformers' tracking of assistant spans is for `return_assistant_tokens_mask`, which
  the encoder doesn't use: it finds turns itself);
- a `tojson` filter that is `json.dumps` (no HTML escaping, `ensure_ascii=False`, with `indent`,
  `separators` and `sort_keys` passed through);
- globals `raise_exception` (a TemplateError), `strftime_now`, `dict` (calls and `fromkeys` only) and
  `namespace` (refusing underscore-prefixed names);
- jinja2 >= 3.1.6, as transformers requires (older ones have known sandbox escapes).

The sandbox itself is subclassed (ChatTemplateEnvironment) with shortcuts that reach the sandbox's
own verdicts faster: rendering Qwen3 rows went from ~85 to ~35 µs, Gemma 4 from ~195 to ~100 µs.

`tests/unit/test_jinja_env.py` renders every named template and each of these features (and the
sandbox's refusals) with this environment and with transformers' and holds the outputs (and errors) equal.
"""

from __future__ import annotations

import json
import types
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

MIN_JINJA = (3, 1, 6)


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}body{% endgeneration %}`: renders body (HF marks it as the assistant's)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [], body).set_lineno(lineno)

    @jinja2.pass_eval_context
    def _generation_support(self, context, caller) -> str:
        return caller()


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes <, >, & and ' for HTML, and takes only `indent`
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return datetime.now().strftime(format)


class TemplateDict:
    """`dict` for templates: builds dicts, and exposes no class or attribute of `dict` itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(Namespace):
    """jinja's namespace, refusing names that start with an underscore (a way into CPython internals)."""

    def __init__(*args, **kwargs):
        # jinja's signature trick, so that `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
                "Please rename the attribute."
            )


_PLAIN_CALLABLES = frozenset({types.BuiltinMethodType, TemplateDict})
# What `getattr(d, name)` finds on a plain dict: any other name read as an attribute is a key.
_DICT_ATTRS = frozenset(dir(dict))


class ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment with shortcuts that decide exactly what it decides. Its
    attribute and call checks were ~40% of rendering Qwen3 and Gemma 4 rows (isinstance against
    ABCs on every `message.content`, `loop.last`, `text.strip()`):

    - `message.content` on a plain dict: jinja tries the attribute, fails (an exception), then reads
      the key; here the key is read at once when `dict` has no attribute of that name.
    - the verdict of `is_safe_attribute` depends on the object's type and the name only (its
      checks are a name prefix and isinstance tests), so it is kept per (type, name) for the exact
      types templates see: JSON values and jinja's loop and namespace objects;
    - a builtin method is called straight away (see `call`).
    """

    _CACHED_TYPES = frozenset({str, dict, list, tuple, int, float, bool, type(None), LoopContext})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._safe: dict[tuple[type, str], bool] = {}

    def getattr(self, obj, attribute):
        if type(obj) is dict and attribute not in _DICT_ATTRS:
            try:
                return obj[attribute]
            except LookupError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def is_safe_attribute(self, obj, attr, value) -> bool:
        kind = type(obj)
        if kind not in self._CACHED_TYPES and kind is not TemplateNamespace:
            return super().is_safe_attribute(obj, attr, value)
        key = (kind, attr)
        verdict = self._safe.get(key)
        if verdict is None:
            verdict = self._safe[key] = super().is_safe_attribute(obj, attr, value)
        return verdict

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's names: no clash with kwargs)
        if type(__obj) not in _PLAIN_CALLABLES and __obj is not TemplateNamespace:
            return super().call(__context, __obj, *args, **kwargs)
        # A builtin method (`text.strip`) can carry no attribute, and our `dict` and `namespace`
        # have none: neither the marks is_safe_callable looks for nor a pass_context flag. What
        # Context.call does with them, without looking:
        kwargs.pop("_block_vars", None)
        kwargs.pop("_loop_vars", None)
        try:
            return __obj(*args, **kwargs)
        except StopIteration:
            return __context.environment.undefined(
                "value was undefined because a callable raised a StopIteration exception"
            )


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit()) if not piece.isdigit() else piece
        parts.append(int(digits or 0))
    return tuple(parts)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    """One environment for every template (jinja caches compiled templates per environment anyway)."""
    if _version(jinja2.__version__) < MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2>={'.'.join(map(str, MIN_JINJA))} (older ones have known sandbox "
            f"escapes, and chat templates are untrusted code); this is {jinja2.__version__}: pip install -U jinja2"
        )
    env = ChatTemplateEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@lru_cache(maxsize=128)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached by its text, as transformers caches it)."""
    return environment().from_string(source)

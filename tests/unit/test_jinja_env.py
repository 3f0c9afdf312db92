"""Our chat-template environment (training/formats/jinja_env.py) renders as transformers' does, and
`trainyard preprocess` no longer imports transformers for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.formats.chat_template import TEMPLATE_NAMES, named_template
from training.formats.jinja_env import compile_template

CASES = Path(__file__).parents[1] / "fixtures" / "axolotl" / "cases"
ROOT = Path(__file__).parents[2]
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}  # as encode passes


def _hf(source: str):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(source)


def _outcome(template, **kwargs):
    """The rendered text, or the error (its type and message) the template raised."""
    try:
        return template.render(**kwargs)
    except Exception as exc:  # raise_exception, a security error: both must raise the same
        return (type(exc).__name__, str(exc))


def _conversations(name: str) -> list[dict]:
    """The golden cases' rows of this template (tools, reasoning traces, system prompts, ...)."""
    rows = []
    for case in sorted(CASES.glob(f"tpl_{name}_*")):
        for line in (case / "data.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            messages = row.get("messages")
            if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages):
                rows.append(row)
    return rows


@pytest.mark.parametrize("name", sorted(TEMPLATE_NAMES))
def test_every_named_template_renders_as_in_transformers(name):
    source = named_template(name)
    ours, theirs = compile_template(source), _hf(source)
    rows = _conversations(name)
    assert rows, name
    rendered = 0
    for row in rows:
        for prompt in (False, True):
            kwargs = {"messages": row["messages"], "add_generation_prompt": prompt, **SPECIAL}
            if row.get("tools"):
                kwargs["tools"] = row["tools"]
            outcome = _outcome(ours, **kwargs)
            assert outcome == _outcome(theirs, **kwargs), (name, row)
            rendered += isinstance(outcome, str)
    assert rendered > len(rows), name  # most rows render: not two equal errors everywhere


FEATURES = {
    "tojson": "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':')) }}"
    "|{{ x | tojson(sort_keys=true) }}|{{ x | tojson(ensure_ascii=true) }}",
    "trim": "{% for m in messages %}\n  {% if m %}\n{{ m }}\n  {% endif %}\n{% endfor %}\n",
    "loop_controls": "{% for i in range(9) %}{% if i == 2 %}{% continue %}{% endif %}"
    "{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}",
    "generation": "a{% generation %}b{{ 1 + 1 }}{% endgeneration %}c",
    "raise": "{{ raise_exception('no system role, please') }}",
    "dict": "{{ dict(a=1, b=x) | tojson }}{{ dict.fromkeys(['k'], 0) | tojson }}",
    "dict_escape": "{{ dict.__class__ }}",
    "namespace": "{% set ns = namespace(n=0, self=2) %}{% for i in range(3) %}{% set ns.n = ns.n + i %}"
    "{% endfor %}{{ ns.n }}{{ ns.self }}",
    "namespace_underscore": "{% set ns = namespace() %}{% set ns._x = 1 %}{{ ns._x }}",
    "namespace_underscore_init": "{% set ns = namespace(_y=1) %}",
    "immutable": "{% set l = [1] %}{{ l.append(2) }}{{ l }}",
    "dunder": "{{ ''.__class__.__mro__ }}",
    "strftime": "{{ strftime_now('%Y-%m') }}",
    "undefined": "{{ missing }}|{{ missing is defined }}",
    # the environment's shortcuts (jinja_env.ChatTemplateEnvironment) against the sandbox's answers
    "dict_keys_as_attributes": "{{ m.role }}|{{ m._hidden }}|{{ m.nope is defined }}|{{ m.items() | list }}"
    "|{{ m.get('role') }}|{{ m.keys is defined }}",
    "dict_mutators": "{{ m.pop('role') }}",
    "dict_update": "{{ m.update({'a': 1}) }}{{ m }}",
    "list_mutators": "{{ messages.pop() }}{{ messages }}",
    "str_methods": "{{ m.role.upper() }}|{{ 'a,b'.split(',') }}|{{ ' x '.strip() }}|{{ m.role.__class__ }}",
    "str_format": "{{ '{0.__class__}'.format(m) }}",
    "calls_in_loops": "{% for s in messages %}{{ s.upper() }}{% set n = namespace(a=loop.index) %}{{ n.a }}"
    "{{ dict(k=s) }}{{ loop.cycle('x', 'y') }}{% endfor %}",
    "loop_internals": "{% for s in messages %}{{ loop.__class__ }}{{ loop._iterator }}{% endfor %}",
    "namespace_attributes": "{% set ns = namespace(a=1) %}{{ ns.a }}|{{ ns.b }}|{{ ns.__class__ }}",
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_the_environment_gives_what_transformers_gives(feature):
    source = FEATURES[feature]
    x = {"ünï": "<b>&'", "n": [1, 2.5, None, True]}
    ours = _outcome(compile_template(source), x=x, messages=["a", "", "b"], m={"role": "user", "_hidden": 1})
    theirs = _outcome(_hf(source), x=x, messages=["a", "", "b"], m={"role": "user", "_hidden": 1})
    assert ours == theirs


def test_a_template_that_does_not_parse_fails_the_same_way():
    import jinja2

    for source in ("{% if %}", "{% generation %}open", "{{ a ", "{{ x | nonsense }}"):
        with pytest.raises(jinja2.TemplateSyntaxError) as ours:
            compile_template(source)
        with pytest.raises(jinja2.TemplateSyntaxError) as theirs:
            _hf(source)
        assert (ours.value.lineno, ours.value.message) == (theirs.value.lineno, theirs.value.message)


def test_preprocess_does_not_import_transformers(tmp_path, tiny_model_dir):
    """A plain tokenizer folder is read with `tokenizers` alone, and the template compiled without
    transformers: its import was ~0.4 s of the command (more than encoding 20k rows)."""
    from training.demo import chat_rows

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows(20, seed=3)))
    (tmp_path / "config.yaml").write_text(
        f"base_model: {tiny_model_dir}\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\n"
    )
    code = (
        "import sys\nfrom training.cli import main\n"
        f"assert main(['preprocess', {str(tmp_path / 'config.yaml')!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'torch', 'numpy')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert "20 samples kept" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout

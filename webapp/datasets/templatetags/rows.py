"""Rows shown as the JSON that was uploaded (not Python's repr of the parsed dict)."""

import json

from django import template

register = template.Library()


@register.filter
def as_json(row) -> str:
    return json.dumps(row, ensure_ascii=False, indent=2)

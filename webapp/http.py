"""Small guards for user input at the web edge: ids from query strings and forms, names that end up
in headers and file names, and where to go back to. A user's typo gets a 404 or a message, never a 500."""

from __future__ import annotations

import re
import unicodedata

from django.utils.http import url_has_allowed_host_and_scheme

MAX_NAME = 200
_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() also accepts "²"


def parse_id(value) -> int | None:
    """A positive database id from user input, or None."""
    return int(value) if isinstance(value, str) and _ID.fullmatch(value) else None


def parse_ids(values) -> list[int]:
    return [i for i in (parse_id(v) for v in values) if i is not None]


def name_problem(name: str, max_length: int = MAX_NAME) -> str | None:
    """Why `name` can't name a dataset, config, run or token, or None if it can."""
    if not name.strip():
        return "can't be empty"
    if len(name) > max_length:
        return f"is {len(name)} characters long; at most {max_length}"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        return "can't hold control characters or line breaks"
    return None


def download_name(name: str) -> str:
    """A file name safe for a Content-Disposition header (names made before validation included)."""
    cleaned = "".join("_" if unicodedata.category(c).startswith(("C", "Z")) and c != " " else c for c in name)
    return cleaned.replace("/", "_").replace("\\", "_").replace('"', "'").strip() or "download"


def safe_next(request, url: str | None, fallback: str) -> str:
    """`url` if it points into this site, else `fallback` (no open redirect)."""
    if url and url_has_allowed_host_and_scheme(url, allowed_hosts={request.get_host()}, require_https=False):
        return url
    return fallback

"""Which base models a config may name: hub ids, or folders under the allowed model directories.

The allowlist of both apps (a run's config, the dataset preview's tokenizer), so it sits beside them, not in either."""

from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def available_models() -> list[str]:
    """Names of local model folders (those with a tokenizer), for forms and the preview."""
    names = []
    for root in settings.TRAINYARD_MODEL_DIRS:
        if root.is_dir():
            names += sorted(p.name for p in root.iterdir() if (p / "tokenizer_config.json").exists())
    return names


def resolve_base_model(name: str) -> str:
    """A config's base_model -> what transformers loads. Raises ValueError naming the fix.

    A bare name is a folder in a model directory; an absolute path must lie inside one (no
    traversal to other files); `owner/name` is a hub id.
    """
    roots = [r.resolve() for r in settings.TRAINYARD_MODEL_DIRS]
    if "/" not in name and ".." not in name:
        for root in roots:
            candidate = root / name
            if candidate.is_dir():
                return str(candidate)
        raise ValueError(f"no model folder named {name!r}; available: {', '.join(available_models()) or 'none'}")
    if name.startswith(("/", "~", ".")):
        path = Path(name).expanduser().resolve()
        if not any(path.is_relative_to(root) for root in roots):
            raise ValueError(
                f"local model paths must be inside the server's model directories ({', '.join(str(r) for r in roots)})"
            )
        if not path.is_dir():
            raise ValueError(f"folder {name!r} does not exist")
        return str(path)
    if HUB_ID.match(name):
        return name
    raise ValueError(f"{name!r} is neither a model folder name nor a hub id like owner/model")

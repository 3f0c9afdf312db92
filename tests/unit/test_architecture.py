"""Dependencies point inward: `training/` never imports the web app or its frameworks."""

import ast
from pathlib import Path

FORBIDDEN = ("webapp", "django", "channels", "huey", "ninja")


def test_training_imports_no_web_framework():
    offenders = []
    for path in (Path(__file__).parents[2] / "training").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []

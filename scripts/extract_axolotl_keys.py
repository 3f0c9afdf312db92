"""Writes training/axolotl_keys.txt: the field names of axolotl's pydantic config, read from its source.

axolotl is installed only to be read, never imported (it pulls in CUDA-only packages):
    python3 -m venv ~/axschema
    ~/axschema/bin/pip install --no-deps --ignore-requires-python axolotl==0.21.0
    python scripts/extract_axolotl_keys.py ~/axschema/lib/python3.*/site-packages/axolotl > training/axolotl_keys.txt
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Plugins whose arguments the seed configs write (axolotl merges a listed plugin's args into the schema).
PLUGINS = ("cut_cross_entropy", "kernels", "liger")


def classes(files: list[Path]) -> dict[str, ast.ClassDef]:
    found = {}
    for f in files:
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ClassDef):
                found[node.name] = node
    return found


def alias_of(value: ast.expr | None) -> str | None:
    """A Field(alias="x") is written as x in YAML."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Field":
        for kw in value.keywords:
            if kw.arg == "alias" and isinstance(kw.value, ast.Constant):
                return kw.value.value
    return None


def fields(name: str, known: dict[str, ast.ClassDef]) -> set[str]:
    node = known[name]
    out: set[str] = set()
    for base in node.bases:
        if isinstance(base, ast.Name) and base.id in known:
            out |= fields(base.id, known)
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            key = stmt.target.id
            if key == "model_config" or "ClassVar" in ast.unparse(stmt.annotation):
                continue
            out.add(alias_of(stmt.value) or key)
    return out


def main(root: Path) -> None:
    known = classes(sorted((root / "utils" / "schemas").rglob("*.py")))
    print("# Field names of axolotl 0.21.0's config schema, extracted by scripts/extract_axolotl_keys.py")
    print("# (AST of axolotl/utils/schemas/ and the seed configs' plugin args; aliases as users write them).")
    print("# One `section: name` a line; sections: top (AxolotlInputConfig), dataset (SFTDataset),")
    print("# plugin:<name> (that plugin's args, valid when it is listed in `plugins`).")
    for key in sorted(fields("AxolotlInputConfig", known)):
        print(f"top: {key}")
    for key in sorted(fields("SFTDataset", known)):
        print(f"dataset: {key}")
    for plugin in PLUGINS:
        plugin_classes = classes([root / "integrations" / plugin / "args.py"])
        names = set()
        for cls in plugin_classes:
            names |= fields(cls, plugin_classes)
        for key in sorted(names):
            print(f"plugin:{plugin}: {key}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

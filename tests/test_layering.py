"""The dependency direction of ARCHITECTURE: config -> parallel -> model -> engine -> train;
data depends only on config; only engine/ imports deepspeed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megamm"
ORDER = ["config", "parallel", "model", "engine", "train"]
# Modules that may import each layer, beyond the layers above it.
SIDE = {"data": {"config"}, "evaluation": set(), "metrics": set()}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _modules() -> list[tuple[str, Path]]:
    return [(str(p.relative_to(PACKAGE.parent).with_suffix("")).replace("/", "."), p) for p in PACKAGE.rglob("*.py")]


def test_nothing_imports_upward() -> None:
    violations = []
    for name, path in _modules():
        own = _layer(name)
        for imported in _imports(path):
            if not imported.startswith("megamm."):
                continue
            target = _layer(imported)
            if target == own:
                continue
            if own in SIDE:
                allowed = SIDE[own]
            elif own in ORDER:
                allowed = set(ORDER[: ORDER.index(own)]) | set(SIDE)
                if own in ("model", "parallel", "config"):
                    allowed -= {"data", "metrics", "evaluation"}
            else:
                allowed = set(ORDER) | set(SIDE)
            if target not in allowed:
                violations.append(f"{name} imports {imported}")
    assert not violations, violations


def test_only_engine_imports_deepspeed() -> None:
    offenders = [
        name
        for name, path in _modules()
        if _layer(name) != "engine" and any(i == "deepspeed" or i.startswith("deepspeed.") for i in _imports(path))
    ]
    assert not offenders, offenders

"""The dependency direction of the architecture: config -> parallel -> model -> engine -> train;
data depends only on config (and the leaf helper fileio); only engine/ (and the model's pipeline
form, megamm.model.pipeline) imports deepspeed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megamm"

# Which megamm layers each layer may import (besides itself). A new layer must be added here.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "flops": {"config"},
    "parallel": {"config"},
    "model": {"config", "parallel"},
    "engine": {"config", "parallel", "model", "fileio"},
    "data": {"config", "fileio"},
    "fileio": set(),
    "evaluation": set(),
    "metrics": {"flops"},
    "preflight": {"config", "data", "engine"},
    "train": {"config", "flops", "parallel", "model", "engine", "data", "evaluation", "metrics", "fileio", "preflight"},
    "cli": {"config", "engine"},
    "pretrained": {"config", "parallel", "model", "data", "fileio"},
    "": {"config", "pretrained"},  # megamm/__init__.py
}


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
    modules = []
    for path in PACKAGE.rglob("*.py"):
        name = str(path.relative_to(PACKAGE.parent).with_suffix("")).replace("/", ".")
        modules.append((name.removesuffix(".__init__"), path))
    return modules


def test_every_module_belongs_to_a_known_layer() -> None:
    unknown = {name for name, _ in _modules() if _layer(name) not in ALLOWED}
    assert not unknown, f"add these layers to ALLOWED: {unknown}"


def test_nothing_imports_upward() -> None:
    violations = [
        f"{name} imports {imported}"
        for name, path in _modules()
        for imported in _imports(path)
        if imported.startswith("megamm.")
        and _layer(imported) != _layer(name)
        and _layer(imported) not in ALLOWED.get(_layer(name), set())
    ]
    assert not violations, violations


# Besides engine/: the model's pipeline form is written as DeepSpeed LayerSpecs.
DEEPSPEED_IMPORTERS = {"megamm.model.pipeline"}


def test_only_engine_imports_deepspeed() -> None:
    offenders = [
        name
        for name, path in _modules()
        if _layer(name) != "engine"
        and name not in DEEPSPEED_IMPORTERS
        and any(i == "deepspeed" or i.startswith("deepspeed.") for i in _imports(path))
    ]
    assert not offenders, offenders

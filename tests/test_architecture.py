"""The layering rules of docs/explanation/architecture.md, checked on the source: imports point down
(also inside functions), no private names imported across packages."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "medssm"

# Lower number = lower layer; a module may import its own layer or any lower one.
LAYERS = {"files": 0, "devices": 0, "progress": 0, "figures": 0, "extras": 0,
          "budget": 0, "labels": 0, "ssm": 1, "nets": 2, "data": 2, "runs": 3, "metrics": 4, "inference": 5, "engine": 6,
          "export": 7, "integrations": 7, "workflows": 8, "cli": 9, "__init__": 10, "__main__": 10}
SIDEWAYS = {("nets", "data"), ("data", "nets")}  # same layer, independent of each other


def unit(module: str) -> str:
    """'medssm.engine.loop' -> 'engine'; 'medssm.files' -> 'files'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        yield path, ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts), rel.name == "__init__"


def imports(path: Path, module: str, is_package: bool):
    """(imported module, names, line) for every import in the file, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


def test_imports_point_down():
    upward = []
    for path, module, is_package in modules():
        own = unit(module)
        for target, _, line in imports(path, module, is_package):
            if target.split(".")[0] != "medssm" or target == "medssm":
                continue
            other = unit(target)
            if other != own and (LAYERS[other] > LAYERS[own] or (own, other) in SIDEWAYS):
                upward.append(f"{path.relative_to(SRC)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_private_names_across_packages():
    crossing = []
    for path, module, is_package in modules():
        for target, names, line in imports(path, module, is_package):
            if target.split(".")[0] != "medssm" or unit(target) == unit(module):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in target.split(".") if p.startswith("_") and not p.startswith("__")]
            if private:
                crossing.append(f"{path.relative_to(SRC)}:{line} imports {private} from {target}")
    assert not crossing, "private names used across packages:\n" + "\n".join(crossing)


def test_every_module_has_a_layer():
    assert {unit(m) for _, m, _ in modules()} <= set(LAYERS)


@pytest.mark.parametrize("source", [
    "from ..engine.loop import train_step\n",       # nets -> engine
    "from medssm.cli import main\n",
])
def test_an_upward_import_is_caught(tmp_path, source):
    path = tmp_path / "x.py"
    path.write_text(source)
    found = [(t, unit(t)) for t, _, _ in imports(path, "medssm.nets.x", False)]
    assert any(LAYERS[u] > LAYERS["nets"] for _, u in found)

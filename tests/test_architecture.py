"""docs/architecture.md is the package's map: every module in it, in a layer, and no module importing from above."""

import ast
import re
from pathlib import Path


ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "trl_dpo_ext"
MAP = ROOT / "docs" / "architecture.md"


def layers() -> dict[str, int]:
    """Module name -> layer number, from the map's `## N. Layer` headings and their "- `module.py`" lines."""
    found, layer = {}, None
    for line in MAP.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## (\d+)\. ", line)
        if heading:
            layer = int(heading[1])
        entry = re.match(r"- `(\w+)\.py`", line)
        if entry and layer is not None:
            assert entry[1] not in found, f"{entry[1]}.py is listed twice"
            found[entry[1]] = layer
    return found


def imports(path: Path) -> set[str]:
    """Our modules that `path` imports, at its top or inside a function (a lazy import is a dependency too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trl_dpo_ext."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("trl_dpo_ext.")}
    return names - {path.stem}


def test_every_module_is_on_the_map_once():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    mapped = set(layers())
    assert modules - mapped == set(), "modules missing from docs/architecture.md"
    assert mapped - modules == set(), "docs/architecture.md lists modules that do not exist"


def test_no_module_imports_from_a_layer_above_its_own():
    layer = layers()
    upward = [
        f"{path.stem} (layer {layer[path.stem]}) imports {name} (layer {layer[name]})"
        for path in sorted(PACKAGE.glob("*.py"))
        for name in sorted(imports(path))
        if name in layer and layer[name] > layer[path.stem]
    ]
    assert upward == []


def test_the_library_imports_no_recipe_benchmark_or_test():
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("recipes", "benchmarks", "tests") for n in names), path.name


def test_the_check_finds_an_upward_import(tmp_path):
    # A test that cannot fail is no test: an import from above, planted in a copy, is what `imports` reports.
    planted = tmp_path / "layout.py"
    planted.write_text((PACKAGE / "layout.py").read_text() + "\n\ndef f():\n    from .trainer import DPOTrainer\n")
    assert "trainer" in imports(planted) and layers()["trainer"] > layers()["layout"]

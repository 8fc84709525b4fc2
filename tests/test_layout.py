"""The library's shape: imports flow one way, from the harnesses down to the attention math."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ntkkv"
# a module may import only modules of a lower rank (or of its own package); so there is no circle
RANKS = {
    "ntkkv.ops": 0, "ntkkv.models": 0,
    "ntkkv.policies": 1, "ntkkv.summaries": 1,
    "ntkkv.plan": 2, "ntkkv.cache": 2,
    "ntkkv.compressor": 3,
    "ntkkv.forward": 4, "ntkkv.reconstruction": 4,
    "ntkkv.patch": 5, "ntkkv.generation": 5,
    "ntkkv.training": 6, "ntkkv.eval": 6,
    "ntkkv.viz": 7,
}


def unit(module: str) -> str:
    """The ranked unit a dotted module name belongs to."""
    for name in sorted(RANKS, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    raise AssertionError(f"{module} has no rank in test_layout.RANKS")


def imported(name: str, source: str, is_package: bool) -> set[str]:
    """The ntkkv modules a module's source imports, relative imports resolved."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "ntkkv")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "ntkkv":
                found.add(target)
    return found


def violations(modules) -> list[str]:
    """modules: (dotted name, source, is a package's __init__) -> every import that does not point down."""
    wrong = []
    for name, source, is_package in modules:
        origin = unit(name)
        for target in imported(name, source, is_package):
            if target == "ntkkv":
                wrong.append(f"{name} imports the package root")
            elif unit(target) != origin and RANKS[unit(target)] >= RANKS[origin]:
                wrong.append(f"{name} (rank {RANKS[origin]}) imports {target} (rank {RANKS[unit(target)]})")
    return wrong


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":  # the public names, imported lazily on first use
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        yield ".".join(parts[:-1] if is_package else parts), path.read_text(encoding="utf-8"), is_package


def test_every_import_points_down():
    assert violations(package_modules()) == []


def test_upward_sideways_and_root_imports_are_caught():
    modules = [
        ("ntkkv.policies.h2o", "from ..forward import compressed_attention_forward\n", False),  # up
        ("ntkkv.summaries.merge", "from ntkkv.policies import SnapKV\n", False),  # sideways, same rank
        ("ntkkv.eval.needle", "import ntkkv\n", False),  # the root: hides where a name comes from
        ("ntkkv.ops", "from .attention import merge_attention\n", True),  # within its own package: fine
        ("ntkkv.forward", "from .ops.decode_attention import merged_decode_attention\n", False),  # down: fine
    ]
    assert violations(modules) == [
        "ntkkv.policies.h2o (rank 1) imports ntkkv.forward (rank 4)",
        "ntkkv.summaries.merge (rank 1) imports ntkkv.policies (rank 1)",
        "ntkkv.eval.needle imports the package root",
    ]

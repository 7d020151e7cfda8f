"""The package's import structure stays a ladder: no module imports itself back through others,
and no part (a top-level module or subpackage of hfcompress) imports one that imports it, so the
parts order into layers (errors and formats of storage at the bottom, the CLI at the top).
Imports inside functions count: they are where circles hide."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hfcompress"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The hfcompress modules ``path`` imports (a name imported from a package is its module when it is one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) for name, path in files.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_module_imports_itself_back():
    # A package's __init__ imports its own modules by design; the modules must not import back.
    edges = {m: {t for t in targets if not (m.startswith(t + ".") and t.count(".") >= 1)}
             for m, targets in graph().items()}
    assert _cycle(edges) is None, f"import circle: {' -> '.join(_cycle(edges))}"


def test_the_parts_order_into_layers():
    parts: dict[str, set[str]] = {}
    for module, targets in graph().items():
        if module == "hfcompress":
            continue  # the package's front door imports everything it re-exports
        parts.setdefault(_part(module), set()).update(_part(t) for t in targets if _part(t) != _part(module))
    assert _cycle(parts) is None, f"a part imports one above it: {' -> '.join(_cycle(parts))}"


def test_the_check_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _run_in_repository_root(code: str) -> "subprocess.CompletedProcess":
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)


def test_the_kernels_folder_does_not_shadow_the_kernel_hub_package_from_the_repository_root():
    """transformers imports Hugging Face's ``kernels``; a Python started in the repository root
    finds our ``kernels/`` folder (``hfcompress.kernels`` once installed) first on its path."""
    import importlib.metadata

    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        installed = False
    else:
        installed = True
    result = _run_in_repository_root("import kernels, transformers; transformers.LlamaConfig(); print(kernels.__file__)")
    if installed:
        assert result.returncode == 0, result.stderr[-2000:]
        assert str(PACKAGE.parent / "kernels") not in result.stdout
    # Without the package (here: without site-packages on the path) the import fails as it would anyway.
    result = _run_in_repository_root("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
                                     "import kernels")
    assert result.returncode != 0 and "ModuleNotFoundError: No module named 'kernels'" in result.stderr
    result = _run_in_repository_root("import hfcompress.kernels.ops")  # our own kernels still import
    assert result.returncode == 0, result.stderr[-2000:]

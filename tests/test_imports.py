"""The import graph (docs/design.md): types at the bottom, no lib module importing a script, no two lib packages
importing each other, no import cycle, and every lib module importable on its own terms."""
import ast
import importlib
import sys
from pathlib import Path

import pytest

from lib.files import ROOT

LIB = ROOT / "lib"
SCRIPTS = {p.stem for p in ROOT.glob("*.py")}
BOTTOM = {"lib.types": set(), "lib.errors": set(), "lib.numerics": set(), "lib.log": set(), "lib.interrupts": set(),
          "lib.environment": set(),
          "lib.files": {"lib.errors"}, "lib.sd_model": set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LIB.rglob("*.py"))}
ENTRY_POINTS = [*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")]


def imported_names(path: Path, top_level_only: bool) -> set[str]:
    """Every module name `path` imports (`from a import b` gives a and a.b); lazy imports inside functions too
    unless told."""
    tree = ast.parse(path.read_text())
    nodes = list(ast.walk(tree))
    if top_level_only:  # `if TYPE_CHECKING:` blocks and try/except around imports still count at import time
        nodes = [n for stmt in tree.body for n in ast.walk(stmt) if not isinstance(stmt, (ast.FunctionDef,
                 ast.AsyncFunctionDef, ast.ClassDef)) and not _is_type_checking(stmt)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def imports_of(path: Path, top_level_only: bool) -> set[str]:
    """Project modules (and script names) that `path` imports."""
    return {name for name in imported_names(path, top_level_only) if name.split(".")[0] in SCRIPTS or name in MODULES}


def third_party_of(path: Path, top_level_only: bool) -> set[str]:
    """Top-level packages, neither the project's nor the standard library's, that `path` imports."""
    return {top for top in (name.split(".")[0] for name in imported_names(path, top_level_only))
            if top not in sys.stdlib_module_names and top not in {"lib", "benchmarks", *SCRIPTS}}


def _is_type_checking(stmt) -> bool:
    return isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test)


def package_of(module: str) -> str:
    """lib.engines.pytorch_engine -> lib.engines; a single-file module of lib is its own node."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (LIB / parts[-1]).is_dir() else module


def test_bottom_modules_import_nothing_of_the_project_but_what_they_are_allowed():
    for name, allowed in BOTTOM.items():
        assert imports_of(MODULES[name], top_level_only=False) <= allowed, name


def test_no_lib_module_imports_a_top_level_script():
    offenders = {name: sorted(i for i in imports_of(path, False) if i.split(".")[0] in SCRIPTS)
                 for name, path in MODULES.items()}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_two_lib_packages_import_each_other():
    edges = {(package_of(name), package_of(dep)) for name, path in MODULES.items()
             for dep in imports_of(path, False) if package_of(dep) != package_of(name)}
    assert {tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges} == set()


def test_no_import_cycle_between_modules_at_import_time():
    graph = {name: {d for d in imports_of(path, True) if d in MODULES and d != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_lib_module_imports(name):
    importlib.import_module(name)  # optional engines (vLLM, SGLang, llama.cpp) are imported inside functions


def modules_loaded_at_import(path: Path) -> set[Path]:
    """`path` and every project module that importing it loads (lazy imports inside functions excluded)."""
    seen, todo = set(), [path]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(MODULES[d] for d in imports_of(current, top_level_only=True) if d in MODULES)
    return seen


@pytest.mark.parametrize("script", sorted(p.relative_to(ROOT).as_posix() for p in ENTRY_POINTS))
def test_every_script_starts_with_the_core_set_alone(script):
    """Each script's optional set (edge, vllm, ...) is imported inside the functions that use it, so that a user
    with only the core set installed gets --help and, at the import that needs more, lib/environment.py's one line
    naming that set; a module-level import of an optional package on the way would fail before either."""
    from lib.environment import requirement_set
    needed = {(package, module.relative_to(ROOT).as_posix()) for module in modules_loaded_at_import(ROOT / script)
              for package in third_party_of(module, top_level_only=True) if requirement_set(package) != "core"}
    assert not needed, sorted(needed)


def test_every_package_the_code_imports_is_declared_in_a_requirement_set():
    """A package imported only because another one happens to bring it breaks the day that one stops (pydantic
    came with typer, starlette with fastapi); lib/environment.py names the set to install from the same files."""
    from lib.environment import requirement_set
    undeclared = {(package, path.relative_to(ROOT).as_posix()) for path in [*MODULES.values(), *ENTRY_POINTS]
                  for package in third_party_of(path, top_level_only=False) if not requirement_set(package)}
    assert not undeclared, sorted(undeclared)

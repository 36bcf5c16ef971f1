"""The house's floors: no tcpidle module imports one above it, and only report prints.

One pass reads top-down (command -> scope and selection -> dump -> decide ->
act -> outcomes -> report), each step calling only downward.  This reads
every module's imports (lazy ones inside functions included) and checks
them against the floors below; a new module must be given its floor here.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import tcpidle

# Top floor first.  A module may import modules on its own floor or below.
FLOORS = [
    ["__main__", "manpage"],
    ["cli"],
    ["commands", "options"],
    ["polling", "doctor"],
    ["passes"],
    ["engine", "kdestroy"],
    ["evidence", "scope", "fallback", "retrofit", "signals"],
    ["owners", "idle", "selectors", "report", "metrics", "privilege", "groups", "histogram",
     "explain"],
    ["health", "middlebox", "tally"],
    ["diag", "netns", "probe", "sinks"],
    ["safetext"],
    ["model", "errors", "bpf"],
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
PACKAGE = pathlib.Path(tcpidle.__file__).parent


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.name == "__init__" and rel.parent == pathlib.Path("."):
            continue
        yield rel.parts[0], path


def imported(path, package_parts):
    """The tcpidle modules (first component below tcpidle) that `path` imports."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "tcpidle":
                target = node.module.split(".")
            else:
                continue
            if len(target) > 1:
                yield target[1]
            else:  # from . import x, y: modules, or names of the package's __init__
                for alias in node.names:
                    if (PACKAGE / alias.name).is_dir() or (PACKAGE / (alias.name + ".py")).exists():
                        yield alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tcpidle" and len(parts) > 1:
                    yield parts[1]


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda x: str(x))
def test_no_module_imports_one_above_it(name, path):
    assert name in FLOOR, "tcpidle/%s: give it a floor in tests/unit/test_layers.py" % name
    parts = ("tcpidle",) + path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    for target in imported(path, list(parts)):
        if target == name:
            continue  # inside one package
        assert target in FLOOR, "%s imports tcpidle.%s, which has no floor" % (path.name, target)
        assert FLOOR[target] >= FLOOR[name], "%s (floor %d) imports %s (floor %d), above it" % (
            path.name, FLOOR[name], target, FLOOR[target])


def test_the_lab_farm_program_uses_the_kernels_so_cookie():
    """tests/lab/farm.py runs under a bare interpreter and keeps SO_COOKIE itself."""
    import ast as _ast

    from tcpidle.model import SO_COOKIE

    farm = pathlib.Path(__file__).parent.parent / "lab" / "farm.py"
    values = [n.value.value for n in _ast.walk(_ast.parse(farm.read_text()))
              if isinstance(n, _ast.Assign) and any(getattr(t, "id", "") == "SO_COOKIE" for t in n.targets)]
    assert values == [SO_COOKIE]


# Modules that may write to stdout/stderr themselves: the reporting module and
# the outputs it writes through; the man page generator prints the page it makes.
PRINTERS = {"report", "sinks", "manpage"}


@pytest.mark.parametrize("name, path", list(modules()), ids=lambda x: str(x))
def test_only_the_reporting_module_prints(name, path):
    if name in PRINTERS:
        return
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", "%s:%d prints" % (path.name, node.lineno)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("write", "writelines") \
                and isinstance(node.func.value, ast.Attribute) \
                and node.func.value.attr in ("stdout", "stderr"):
            raise AssertionError("%s:%d writes to sys.%s" % (path.name, node.lineno,
                                                             node.func.value.attr))

"""Dependencies flow one way: common <- client, server <- simulations, with the command line
(simulations/cli.py) on top and imported by nothing, without cycles inside a layer, and the
project's own code raises no DeprecationWarning."""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("common", "client", "server", "simulations")
ALLOWED = {"common": {"common"}, "client": {"common", "client"},
           "server": {"common", "server"}, "simulations": set(PACKAGES)}
CLI = "simulations.cli"


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` that runs: ``if TYPE_CHECKING:`` blocks (annotations only) are
    left out."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module in ``path``, at any depth (not those
    made for type checking only)."""
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return out


def modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")
            if p.stem != "__init__"}


def test_imports_follow_the_layers():
    bad = []
    for name, path in modules().items():
        pkg = name.split(".")[0]
        for line, mod in project_imports(path):
            if mod.split(".")[0] not in ALLOWED[pkg]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "imports against common <- client/server <- simulations:\n" + "\n".join(bad)


def test_the_command_line_is_imported_by_nothing():
    users = [f"{p.relative_to(REPO)}:{line}" for name, p in modules().items()
             for line, mod in project_imports(p) if mod == CLI]
    assert not users, f"{CLI} is the top of the stack; imported by: {', '.join(users)}"
    assert "simulations.cli:main" in (REPO / "pyproject.toml").read_text()


def test_no_import_cycle_between_modules():
    mods = modules()
    graph = {m: {i for _, i in project_imports(p) if i in mods and i != m}
             for m, p in mods.items()}
    cycles = []

    def visit(m, stack):
        for n in graph.get(m, ()):
            if n in stack:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif len(stack) < 12:
                visit(n, stack + [n])

    for m in graph:
        visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles)))


@pytest.mark.parametrize("module", ["common.data", "client.app", "server.workflow",
                                    "simulations.simulate"])
def test_a_deprecation_warning_from_the_project_fails_the_suite(module):
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("a deprecated call", DeprecationWarning, f"{module}.py", 1,
                               module=module)
    warnings.warn_explicit("elsewhere", DeprecationWarning, "torch/x.py", 1, module="torch.x")


LONG_ON_PURPOSE = {"common/config.py", "common/protocol.py"}   # the README says why


def test_modules_stay_under_400_lines_except_those_the_readme_names():
    long = sorted(str(p.relative_to(REPO)) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
                  if len(p.read_text().splitlines()) > 400)
    assert set(long) <= LONG_ON_PURPOSE, f"over 400 lines: {sorted(set(long) - LONG_ON_PURPOSE)}"
    readme = (REPO / "README.md").read_text()
    assert all(f"`{p}`" in readme for p in LONG_ON_PURPOSE)

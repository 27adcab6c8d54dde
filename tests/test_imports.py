"""No import circles: in the package (module-level `from softprompt.X import` lines) and in bench/ (any import,
lazy ones included); every softprompt module imports in a fresh interpreter; bench scripts run as `python -m
bench.X` and never edit sys.path; softprompt.parsers and softprompt.config import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(pkg: str) -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / pkg).rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _module_level(body: Iterable[ast.stmt]) -> Iterable[ast.stmt]:
    """The statements that run when the module is imported: into if/try/with blocks, not functions or classes,
    and not `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, ast.If):
            if not _is_type_checking(node):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                yield from _module_level(block)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        else:
            yield node


def _imports(name: str, path: Path, mods: dict[str, Path], *, lazy: bool) -> set[str]:
    """The modules of `mods` that module `name` imports (`from P import sub` counts as the submodule P.sub)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = ast.walk(tree) if lazy else _module_level(tree.body)
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            for a in node.names:
                out.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod)
    return {m for m in out if m in mods and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    found: list[list[str]] = []

    def visit(u: str, stack: list[str]) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                found.append([*stack[stack.index(v) :], v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    mods = _modules("softprompt")
    graph = {m: _imports(m, p, mods, lazy=False) for m, p in mods.items()}
    assert "softprompt.config" in graph["softprompt.distributed"]  # the scan sees `from softprompt.X import`
    assert not _cycles(graph)


def test_the_cli_modules_do_not_import_each_other_in_a_circle() -> None:
    """cli -> distributed (lazily, to run `train`) and never back: build_config lives in softprompt.config."""
    mods = _modules("softprompt")
    lazy = {m: _imports(m, mods[m], mods, lazy=True) for m in ("softprompt.distributed", "softprompt.parsers")}
    assert "softprompt.cli" not in lazy["softprompt.distributed"]
    assert lazy["softprompt.parsers"] <= {"softprompt.config", "softprompt.commands"}


def test_no_import_cycle_in_bench() -> None:
    mods = _modules("bench")
    graph = {m: _imports(m, p, mods, lazy=True) for m, p in mods.items()}  # function-level imports too
    assert "bench._common" in graph["bench.speed"]
    assert not _cycles(graph)


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_do_not_edit_sys_path(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "sys.path" not in text
    assert "python bench/" not in (ast.get_docstring(ast.parse(text)) or ""), "docstring: run it as python -m bench.X"


def test_every_module_imports_in_a_fresh_interpreter() -> None:
    names = sorted(m for m in _modules("softprompt") if not m.endswith("__main__"))  # __main__ runs the CLI
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


def test_parsers_and_config_import_without_torch() -> None:
    code = (
        "import sys, softprompt.parsers, softprompt.config\n"
        "softprompt.parsers.build_parser()\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'fastapi') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bench_runs_as_a_module() -> None:
    """`python -m bench.X` from the checkout: the bench package and the checkout's softprompt, no path edits."""
    code = "import bench.quality, bench.quality_experiments, bench.quality_report, bench._common"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]

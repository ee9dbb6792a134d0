"""The package's shape: no import cycles between its modules, and no import inside a function
between them without a reason written beside it (a comment on that line or the line above).

Run as a script to list the offenders: ``python tests/test_layout.py``.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hollownet"


def module_name(path: Path) -> str:
    parts = ("hollownet", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "model" not in p.relative_to(PACKAGE).parts[:-1]}


def _targets(node: ast.AST, here: str, is_pkg: bool, known: dict[str, Path]) -> list[str]:
    """The package's modules that an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = here.split(".") if is_pkg else here.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return [n for n in names if n in known]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def scan() -> tuple[dict[str, set[str]], list[str]]:
    """(import graph over all imports, function-level imports without a reason: 'file:line')."""
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    unexplained = []
    for name, path in known.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        skip = {id(n) for t in ast.walk(tree) if _type_checking(t) for n in ast.walk(t)}
        funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inner = {id(n) for f in funcs for n in ast.walk(f) if n is not f}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in skip:
                continue
            targets = [t for t in _targets(node, name, path.name == "__init__.py", known) if t != name]
            graph[name].update(targets)
            if targets and id(node) in inner:
                line = lines[node.lineno - 1]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                if "#" not in line and not above.startswith("#"):
                    unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {line.strip()}")
    return graph, unexplained


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _ignore_packages(graph):
    # A package's __init__ importing its own submodules (or a submodule importing its package's
    # __init__ for a name defined there) is not a cycle between stages.
    return {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + "."))} for m, ts in graph.items()}


# The ground floor: what each of these modules may import of hollownet (the rest of the package builds on them).
GROUND = {
    "hollownet.errors": set(),
    "hollownet.files": {"hollownet.errors"},  # the file-writing library (atomic writes, JSON, temp files)
    "hollownet.peft_internals": set(),  # peft's internals, in one place
}


def test_ground_floor_imports_nothing_above():
    graph, _ = scan()
    assert {m: sorted(graph[m] - allowed) for m, allowed in GROUND.items() if graph[m] - allowed} == {}


def test_no_import_cycles():
    graph, _ = scan()
    assert cycles(_ignore_packages(graph)) == []


def test_function_level_imports_say_why():
    _, unexplained = scan()
    assert unexplained == []


def test_scanner_sees_cycles_and_reasons(tmp_path):
    # The checks above must be able to fail: a two-module cycle and an unexplained inner import.
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# ------------------------------------------------------------------------------ wide functions
# Issue 24's rule: no function over MAX_LINES lines or MAX_PARAMS parameters (``self`` / ``cls`` not
# counted) without a reason beside it: ``# wide: <reason>`` on its ``def`` line, or, for files other
# work is changing now, an entry in WIDE below.
MAX_LINES, MAX_PARAMS = 80, 10
WIDE = {
    "cli.py:build_parser": "argparse's tree of every subcommand and flag, declared flat in one place",
    "stages/generate.py:generate": "generation and the planner (memory/predict.py) call it with these keywords; next: a settings object",
}
WIDE_MARK = re.compile(r"#\s*wide:\s*\S")


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def wide_functions(root: Path = PACKAGE) -> dict[str, str]:
    """Every function over the limits: 'path:name' -> its size, and whether a reason is given ('' if not)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            n_lines, n_params = node.end_lineno - node.lineno + 1, _params(node)
            if n_lines > MAX_LINES or n_params > MAX_PARAMS:
                key = f"{path.relative_to(root).as_posix()}:{node.name}"
                why = "marked" if WIDE_MARK.search(lines[node.lineno - 1]) else "WIDE" if key in WIDE else ""
                out[key] = f"{n_lines} lines, {n_params} parameters" + (f" ({why})" if why else "")
    return out


def test_wide_functions_say_why():
    unexplained = {k: v for k, v in wide_functions().items() if not v.endswith(")")}
    assert unexplained == {}, f"over {MAX_LINES} lines or {MAX_PARAMS} parameters without '# wide: <reason>'"


def test_wide_list_is_not_stale():
    found = wide_functions()
    assert [k for k in WIDE if k not in found] == [], "no longer wide (or moved): remove it from WIDE"


def test_wide_check_can_fail(tmp_path):
    many = ", ".join(f"a{i}" for i in range(11))
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    (tmp_path / "m.py").write_text(
        f"def many({many}):\n    pass\n\n\ndef long():\n{body}\n\n\n"
        f"def ok(self, {', '.join(f'a{i}' for i in range(10))}):\n    pass\n\n\n"
        f"def told({many}):  # wide: a reason\n    pass\n"
    )
    assert wide_functions(tmp_path) == {"m.py:many": "2 lines, 11 parameters",
                                        "m.py:long": "81 lines, 0 parameters",
                                        "m.py:told": "2 lines, 11 parameters (marked)"}


if __name__ == "__main__":
    graph, unexplained = scan()
    for c in cycles(_ignore_packages(graph)):
        print("cycle:", " <-> ".join(c))
    print("\n".join(unexplained))
    print(f"{len(unexplained)} function-level imports without a reason")
    for key, size in wide_functions().items():
        print(f"wide: {key}: {size}")

"""The architecture, enforced: read every module's imports and check the layering rules.

- no import cycle between files (an import inside a function counts: a lazy import does not hide a cycle);
- the foundation (`unclip/`, the pipeline included) imports no stage; only the top floor, the CLI and training
  scripts in `unclip/cli`, may;
- a stage (`prior/`, `decoder/`, `upsamplers/`) imports only the foundation: never another stage, the pipeline or the
  CLI;
- a package's `__init__.py` imports eagerly: no module-level `__getattr__`, no import inside a function;
- exactly one module imports `open_clip`;
- no module assigns to an attribute of another library's module (e.g. `constants.HF_HUB_OFFLINE = True`): another
  library's settings are read, never changed.

Imports under `if TYPE_CHECKING:` are annotations only, and are not counted.
"""

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prior", "decoder", "upsamplers")
PACKAGES = ("unclip", *STAGES)
TOP_FLOOR = ("unclip.cli",)  # the only place where stages meet
ABOVE_STAGES = ("unclip.pipeline", "unclip.cli")  # what a stage never imports


# ----- reading the import graph ----------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_file(module: str) -> Path | None:
    """The file of one of our modules (`a.b` -> a/b.py or a/b/__init__.py); None for other libraries'."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            found.extend(n for child in node.orelse for n in _import_nodes(child))
        else:
            found.extend(_import_nodes(node))
    return found


def _imported(node: ast.Import | ast.ImportFrom, package: str) -> list[tuple[str, str | None]]:
    """(module, name bound) per alias: `from pkg import name` gives pkg.name when that is a module of ours, else pkg;
    relative imports are resolved against `package`."""
    if isinstance(node, ast.Import):
        return [(a.name, a.asname or a.name.split(".")[0]) for a in node.names]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        module = f"{base}.{node.module}" if node.module else base
    else:
        module = node.module or ""
    out = []
    for a in node.names:
        sub = f"{module}.{a.name}"
        out.append((sub if _module_file(sub) else module, a.asname or a.name))
    return out


def _package_of(path: Path) -> str:
    name = _module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imports_of_tree(tree: ast.Module, package: str) -> set[str]:
    return {m for node in _import_nodes(tree) for m, _ in _imported(node, package)}


def _imports(path: Path) -> set[str]:
    """The dotted names of the modules `path` imports (ours resolved to the submodule a `from` names)."""
    return _imports_of_tree(_tree(path), _package_of(path))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _files() -> list[Path]:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    """File -> the files of ours it imports."""
    return {_rel(p): {_rel(f) for m in _imports(p) if (f := _module_file(m)) and f != p} for p in _files()}


def _within(module: str, packages: tuple[str, ...]) -> bool:
    """Whether `module` is one of `packages` or inside one (module boundaries, not string prefixes)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as its nodes, first node repeated at the end ([a, b, a]); None if acyclic."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def _writes_to_other_libraries(tree: ast.Module, package: str) -> list[str]:
    """`name.attr = ...` (or +=, or setattr(name, ...)) where `name` is bound by an import of another library, as
    source text."""
    imported = {bound for node in _import_nodes(tree) for module, bound in _imported(node, package)
                if module.split(".")[0] not in (*PACKAGES, "__future__")}

    def root(expr: ast.expr) -> str | None:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    def unpacked(target: ast.expr) -> list[ast.expr]:  # a, (b.c, *d) = ...
        if isinstance(target, (ast.Tuple, ast.List)):
            return [t for element in target.elts for t in unpacked(element)]
        return unpacked(target.value) if isinstance(target, ast.Starred) else [target]

    targets: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets.extend(t for target in node.targets for t in unpacked(target))
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets.append(node.target)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            targets.append(ast.Attribute(node.args[0], "?", ast.Store()))
    return [ast.unparse(t) for t in targets if isinstance(t, ast.Attribute) and root(t) in imported]


def _lazy_package_tricks(tree: ast.Module) -> list[str]:
    """A module-level `__getattr__` (PEP 562) or an import not at module level: what an eager `__init__` avoids."""
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
    nested = {id(n): n for scope in ast.walk(tree) if isinstance(scope, scopes) for n in _import_nodes(scope)}
    getattr_defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
    getattr_sets = [node for node in tree.body if isinstance(node, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "__getattr__" for t in node.targets)]
    return ([f"line {n.lineno}: module-level __getattr__" for n in [*getattr_defs, *getattr_sets]]
            + [f"line {n.lineno}: import inside a function or class: {ast.unparse(n)}" for n in nested.values()])


# ----- the rules ---------------------------------------------------------------------------------------------------
def test_no_import_cycle_between_files():
    cycle = find_cycle(_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_foundation_imports_no_stage():
    for path in _files():
        module = _module_name(path)
        if module.split(".")[0] != "unclip" or _within(module, TOP_FLOOR):
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in STAGES}
        assert not bad, f"{_rel(path)} (foundation) imports stage module(s) {sorted(bad)}"


def test_stages_import_only_the_foundation():
    for path in _files():
        stage = _module_name(path).split(".")[0]
        if stage not in STAGES:
            continue
        others = {m for m in _imports(path) if m.split(".")[0] in STAGES and m.split(".")[0] != stage}
        assert not others, f"{_rel(path)} imports another stage: {sorted(others)}"
        above = {m for m in _imports(path) if _within(m, ABOVE_STAGES) or m == "unclip"}  # unclip/__init__: the API
        assert not above, f"{_rel(path)} imports the pipeline/CLI layer: {sorted(above)}"


def test_packages_import_eagerly():
    for path in _files():
        if path.name == "__init__.py":
            tricks = _lazy_package_tricks(_tree(path))
            assert not tricks, f"{_rel(path)}: {tricks}"


def test_only_one_module_imports_open_clip():
    users = [_rel(path) for path in _files() if any(m.split(".")[0] == "open_clip" for m in _imports(path))]
    assert users == ["unclip/clip/model.py"], users


def test_no_module_changes_another_librarys_settings():
    for path in _files():
        writes = _writes_to_other_libraries(_tree(path), _package_of(path))
        assert not writes, f"{_rel(path)} assigns to another library's module: {writes}"


# ----- the checker, checked ----------------------------------------------------------------------------------------
def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]
    assert find_cycle({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == ["a", "b", "a"]


def test_the_checker_resolves_imports_as_python_does():
    source = ("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nimport torch.nn as nn\n"
              "from .. import hub\nfrom .model import Clip\nfrom ..clip import ClipConfig\n"
              "def f():\n    from prior import sampling\n"
              "if TYPE_CHECKING:\n    from decoder import Decoder\n")
    found = _imports_of_tree(ast.parse(source), "unclip.clip")
    assert {"unclip.hub", "unclip.clip.model", "unclip.clip", "prior.sampling", "torch.nn"} <= found
    assert not any(m.startswith("decoder") for m in found)  # under TYPE_CHECKING
    assert _imports_of_tree(ast.parse("from . import pipeline\n"), "unclip") == {"unclip.pipeline"}
    assert "unclip.checkpoint" in _imports(ROOT / "unclip" / "clip" / "model.py")
    assert _module_name(ROOT / "unclip" / "clip" / "__init__.py") == "unclip.clip"
    assert _within("unclip.cli.main", ("unclip.cli",)) and not _within("unclip.clip", ("unclip.cli",))


def test_the_checker_sees_writes_to_other_libraries_and_lazy_packages():
    source = ("import huggingface_hub.constants as hc\nimport datasets\nfrom torch import backends\n"
              "from unclip import hub\nimport os\nhc.HF_HUB_OFFLINE = True\ndatasets.config.HF_HUB_OFFLINE = True\n"
              "def f(x):\n    backends.cudnn.benchmark = True\n    setattr(os, 'sep', '/')\n"
              "    hub.PROXY_VARIABLES = ()\n    x.y = 1\n    os.environ['A'] = '1'\n")
    assert _writes_to_other_libraries(ast.parse(source), "unclip") == [
        "hc.HF_HUB_OFFLINE", "datasets.config.HF_HUB_OFFLINE", "backends.cudnn.benchmark", "os.?"]
    lazy = "import os\ndef __getattr__(name):\n    import importlib\n    return importlib.import_module('.' + name)\n"
    assert [t.split(":")[1] for t in _lazy_package_tricks(ast.parse(lazy))] == [
        " module-level __getattr__", " import inside a function or class"]
    assert _lazy_package_tricks(ast.parse("from .a import b\nif b:\n    import os\n")) == []

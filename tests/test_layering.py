"""The architecture, enforced: read every module's imports and check the layering rules.

- the foundation (`unclip/`, except the pipeline and the CLI) imports no stage;
- a stage (`prior/`, `decoder/`, `upsamplers/`) imports only the foundation, never another stage;
- exactly one module imports `open_clip`.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prior", "decoder", "upsamplers")
STAGE_MEETING_POINTS = ("unclip/pipeline", "unclip/cli")  # the only places where stages may meet


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.add(module)
    return names


def _within(module: str, packages: tuple[str, ...]) -> bool:
    """Whether `module` is one of `packages` or inside one (module boundaries, not string prefixes)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def _modules(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def test_foundation_imports_no_stage():
    for path in _modules("unclip"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(STAGE_MEETING_POINTS):
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] in STAGES}
        assert not bad, f"{rel} (foundation) imports stage module(s) {sorted(bad)}"


def test_stages_import_only_the_foundation():
    for stage in STAGES:
        for path in _modules(stage):
            rel = path.relative_to(ROOT).as_posix()
            others = {m for m in _imports(path) if m.split(".")[0] in STAGES and m.split(".")[0] != stage}
            assert not others, f"{rel} imports another stage: {sorted(others)}"
            pipeline = {m for m in _imports(path) if _within(m, ("unclip.pipeline", "unclip.cli"))}
            assert not pipeline, f"{rel} imports the pipeline/CLI layer: {sorted(pipeline)}"


def test_only_one_module_imports_open_clip():
    users = [
        path.relative_to(ROOT).as_posix()
        for top in ("unclip", *STAGES)
        for path in _modules(top)
        if any(m.split(".")[0] == "open_clip" for m in _imports(path))
    ]
    assert users == ["unclip/clip/model.py"], users


def test_the_checker_sees_relative_imports_and_module_boundaries():
    probe = ROOT / "unclip" / "clip" / "model.py"
    assert "unclip.checkpoint" in _imports(probe)
    assert _within("unclip.cli.main", ("unclip.cli",)) and not _within("unclip.clip", ("unclip.cli",))

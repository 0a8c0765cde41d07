"""The import rule (README "Architecture"): library modules never import a stage, a stage never imports another
stage or the CLI, and the package has no import cycles. Read from the source with ``ast`` (function-level
imports included), so a violation is named with its file and line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "octa3d"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """``(imported octa3d module, line)`` for every import in the file (any nesting level)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "octa3d"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "octa3d":
                continue
            for a in node.names:  # `from octa3d.x import y` imports module octa3d.x.y when y is a module
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno))
    return [(m, line) for m, line in out if m in known]


#: Modules of ``octa3d.stages`` that are no stage: the set-up every stage shares.
SHARED_STAGE_MODULES = ("octa3d.stages.context",)


def stage_of(mod: str) -> str | None:
    """The stage a module belongs to (``octa3d.stages.<stage>[.*]``), or None (library, CLI, the stage table, the
    stages' shared set-up)."""
    parts = mod.split(".")
    if mod in SHARED_STAGE_MODULES:
        return None
    return parts[2] if len(parts) > 2 and parts[1] == "stages" else None


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    mods = all_modules()
    return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def test_every_mode_has_a_stage_module_with_run():
    from octa3d.config import MODES
    from octa3d.stages import STAGES

    assert set(STAGES) == set(MODES)
    mods = all_modules()
    for mode, module in STAGES.items():
        assert module in mods, f"--mode {mode}: {module} does not exist"
        assert module.split(".")[2] == mode, f"{module}: a stage's module is named after its mode (run folder)"
        tree = ast.parse(mods[module].read_text(encoding="utf-8"))
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert "run" in names, f"{module} has no run(cfg)"


def test_library_modules_never_import_a_stage(graph):
    bad = [f"{m} line {line} imports {dep}" for m, deps in graph.items() for dep, line in deps
           if stage_of(m) is None and m not in ("octa3d.cli", "octa3d.stages") and stage_of(dep) is not None]
    bad += [f"{m} line {line} imports the stage table" for m, deps in graph.items() for dep, line in deps
            if stage_of(m) is None and m != "octa3d.cli" and dep == "octa3d.stages"]
    assert not bad, "library -> stage imports:\n" + "\n".join(bad)


def test_only_stages_import_their_shared_set_up(graph):
    bad = [f"{m} line {line} imports {dep}" for m, deps in graph.items() for dep, line in deps
           if dep in SHARED_STAGE_MODULES and not m.startswith("octa3d.stages.")]
    assert not bad, "library -> stage set-up imports (move what they need into the library):\n" + "\n".join(bad)


def test_stages_import_no_other_stage_and_not_the_cli(graph):
    bad = []
    for m, deps in graph.items():
        own = stage_of(m)
        if own is None:
            continue
        for dep, line in deps:
            if dep == "octa3d.cli" or (stage_of(dep) not in (None, own)):
                bad.append(f"{m} line {line} imports {dep}")
    assert not bad, "stage -> stage/CLI imports (compose stages through octa3d.stages.STAGES):\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    edges = {m: sorted({d for d, _ in deps if d != m}) for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    # a package's __init__ re-exporting its own submodules is not a cycle between modules
    real = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") or c[0].startswith(x + ".")
                                         for x in c)]
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_rule_checker_catches_a_violation(tmp_path):
    """The checker itself: a made-up library module importing a stage is reported with its line."""
    fake = tmp_path / "octa3d" / "metrics_fake.py"
    fake.parent.mkdir()
    fake.write_text("import os\n\ndef f():\n    from octa3d.stages.train import run\n", encoding="utf-8")
    deps = imports_of(fake, "octa3d.metrics_fake", {"octa3d.stages.train", "octa3d.metrics_fake"})
    assert deps == [("octa3d.stages.train", 4)]
    assert stage_of("octa3d.stages.train") == "train" and stage_of("octa3d.training") is None


def test_no_module_over_the_size_limit():
    """Modules are split by responsibility before they grow past ~400 lines (README "Architecture")."""
    big = {m: n for m, p in all_modules().items()
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert not big, f"modules over 420 lines: {big}"


def test_the_command_line_starts_without_torch():
    """``octa3d --help`` and the argument errors must not wait for torch/MONAI: the function-level imports that
    remain exist for this (each says so)."""
    code = ("import sys, octa3d.cli; heavy = [m for m in ('torch', 'monai', 'pandas') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=PACKAGE.parent)

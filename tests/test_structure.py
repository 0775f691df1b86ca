"""The layout keeps its promises: arrows run one way (front ends -> checks -> measure -> intake -> core),
no import cycle, and no folder, file or function grows past what one reader takes in."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {"finding", "check", "captioner", "registry", "runner", "state", "hooks", "errors", "usercode"}


def _modules() -> dict:
    out = {}
    for base, pkg in ((ROOT / "capdiag", "capdiag"), (ROOT / "checks", "capdiag.checks"), (ROOT / "models", "capdiag.models")):
        for p in base.rglob("*.py"):
            parts = [pkg] + list(p.relative_to(base).with_suffix("").parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = p
    return out


def _imports(mods: dict) -> dict:
    edges = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found.add(target if target in mods else base)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        edges[name] = {t for t in found if t in mods and t != name}
    return edges


def test_no_import_cycle():
    edges = _imports(_modules())
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for t in edges[m]:
            assert state.get(t) != "open", " -> ".join(path + [t])
            if t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [m])


def test_core_imports_no_room_and_intake_no_measurement():
    edges = _imports(_modules())
    for m, targets in edges.items():
        parts = m.split(".")
        if len(parts) == 2 and parts[1] in CORE:
            assert not {t for t in targets if t.split(".")[1] not in CORE}, m
        if len(parts) > 2 and parts[1] == "intake":
            assert not {t for t in targets if t.startswith("capdiag.measure")}, m
        if len(parts) > 2 and parts[1] in ("intake", "measure"):  # the prompted room sits above them
            assert not {t for t in targets if t.startswith("capdiag.prompted")}, m
        if len(parts) > 2 and parts[1] == "prompted":  # and reads only the core and intake
            assert not {t for t in targets if t.split(".")[1] in ("measure", "checks", "report", "viz")}, m


def test_folders_files_and_functions_stay_small():
    for folder in [ROOT / "capdiag", *(p for p in (ROOT / "capdiag").iterdir() if p.is_dir() and not p.name.startswith("_"))]:
        assert len(list(folder.glob("*.py"))) <= 20, folder
    for path in _modules().values():
        tree = ast.parse(path.read_text())
        assert len(path.read_text().splitlines()) <= 400, path
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 80, f"{path}:{node.lineno} {node.name}"

"""The package has no import cycles: every module imports on its own, in any order, and our
own modules are imported at the top of files (an import hidden inside a function is how a
cycle hides)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("magicfuse", "flows", "stages")


def _modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            if rel.name == "__main__":
                continue
            names.append(".".join(parts))
    return names


def test_every_module_imports_alone_in_any_order():
    mods = _modules()
    assert "magicfuse.inference" in mods and "magicfuse.tracking" in mods and len(mods) > 40  # premise
    # One interpreter; before each import every module of ours is forgotten, so each one is
    # imported first (then forwards and backwards, so any pair is tried in both orders).
    code = f"""
import importlib, sys
mods = {mods!r}
failed = []
for order in (mods, mods[::-1]):
    for name in order:
        for k in [k for k in sys.modules if k.split('.')[0] in {PACKAGES!r}]:
            del sys.modules[k]
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]


def test_our_modules_are_imported_at_the_top_of_files():
    hidden = []
    for name in _modules():
        path = REPO / Path(*name.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").split(".")[0] in PACKAGES:
                        hidden.append(f"{path.relative_to(REPO)}:{inner.lineno} from {inner.module}")
                    elif isinstance(inner, ast.Import) and any(a.name.split(".")[0] in PACKAGES for a in inner.names):
                        hidden.append(f"{path.relative_to(REPO)}:{inner.lineno} import")
    assert not hidden, "imports of our modules inside functions:\n" + "\n".join(hidden)

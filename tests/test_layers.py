"""The house the imports draw: the folders of docs/architecture.md are the layers, every opdlab import points down
them, no module reaches another's private name, and building a RunSpec loads no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opdlab"

# The folders of docs/architecture.md, bottom to top; a module may import from its own folder or any folder below.
# The leaves sit at the bottom; the public entries (``opdlab.testing``, ``python -m opdlab``) at the top.
LAYERS = [
    ["errors", "files", "heartbeat"],  # leaves every layer may use
    ["config"],         # torch-free: names, checks, recipes, specs, runtimes, presets
    ["tasks"],
    ["core"],           # tensors in, tensors out
    ["lm"],
    ["exact"],
    ["audit"],
    ["rundir"],
    ["training"],
    ["experiments"],
    ["report"],
    ["app"],
    ["integrations"],
    ["testing", "__main__", "__init__"],
]
FOLDERS = [name for layer in LAYERS for name in layer if (PACKAGE / name).is_dir()]
MAPS_THAT_BUILD = {"tasks"}  # ``opdlab.tasks.get_task`` is a public name: its map builds tasks by name


def _layer(module: str):
    """Layer index of ``opdlab.<module>``: its folder's, or its own for a module at the top."""
    head = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if head in layer:
            return i
    return None


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" and len(rel.parts) > 1 else rel.parts
        yield ".".join(parts), path


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opdlab"):
            base = node.module[len("opdlab."):] if node.module != "opdlab" else ""
            found |= {f"{base}.{a.name}".strip(".") if not base else base for a in node.names}
            if not base:
                found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("opdlab."):] for a in node.names if a.name.startswith("opdlab.")}
    return {m for m in found if m}


def _upward(modules) -> list[str]:
    upward = []
    for module, path in modules:
        mine = _layer(module)
        assert mine is not None, f"opdlab.{module} is in no folder of LAYERS: put it in the folder it belongs to"
        for target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    return upward


def test_every_import_points_down_the_layers():
    upward = _upward(_modules())
    assert not upward, "\n".join(upward)


def test_the_check_fails_on_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from opdlab.training.step import sample\n")
    assert _upward([("core.bad", bad)]) == ["core.bad (layer 3) imports training.step (layer 8)"]


def test_the_top_holds_only_leaves_folders_and_public_entries():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "errors", "files", "heartbeat", "testing"]
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert folders == sorted(FOLDERS)


def _private_imports(modules) -> list[str]:
    found = []
    for module, path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opdlab"):
                found += [f"{module} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_name(tmp_path):
    found = _private_imports(_modules())
    assert not found, "\n".join(found)
    bad = tmp_path / "bad.py"
    bad.write_text("from opdlab.training.step import _Clock\n")
    assert _private_imports([("x", bad)]) == ["x imports opdlab.training.step._Clock"]


def test_every_folder_map_imports_nothing():
    busy = [name for name in FOLDERS if name not in MAPS_THAT_BUILD and _imports(PACKAGE / name / "__init__.py")]
    assert not busy, f"these folders' __init__.py import modules: {busy}"
    for name in FOLDERS:
        assert ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())), f"{name} has no map"


def test_no_package_line_is_over_120_characters():
    long = [f"{p.relative_to(PACKAGE)}:{i}" for p in sorted(PACKAGE.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, long


def test_the_check_fails_on_an_unplaced_module():
    assert _layer("a_module_nobody_placed") is None


def test_no_module_imports_notebooks_benchmarks_or_tests():
    offenders = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{module} imports {n}" for n in names if n.split(".")[0] in ("notebooks", "benchmarks", "tests")]
    assert not offenders, offenders


def test_a_spec_is_built_without_torch():
    code = ("import sys; from opdlab.config.spec import RunSpec; from opdlab.config.presets import get; from opdlab.config.runtime import Runtime; "
            "s = RunSpec.from_dict(dict(divergence='gjsd:0.3', baseline='loo')); s.models.recipe('teacher'); "
            "get('notebook04').spec_for('tool_use'); Runtime(device='cpu'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""The house the imports draw: every opdlab import points down the layers of the map in docs/architecture.md,
and building a TrainConfig loads no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opdlab"

# The map of docs/architecture.md, bottom to top; a module may import from its own layer or any layer below.
LAYERS = [
    ["errors", "files", "lm"],                              # the one user-facing exception; verified files; lm (empty)
    ["choices", "tasks", "heartbeat", "stats"],             # names, tasks, statistics: no torch
    ["divergences", "lm.recipe", "spec", "runtime", "presets", "tracking"],   # a run's spec: no torch
    ["estimators", "sparse", "lm.device", "lm.tokenizer"],
    ["toy", "sparse_toy", "symbolic", "lm.modeling", "lm.block", "lm.decoder", "lm.packed", "lm.sampling", "lm.sft",
     "audit_types", "audit_sources"],
    ["audit_catalogue"],
    ["montecarlo", "audit", "lm.cache"],
    ["testing", "audit_docs"],
    ["runread", "runlog", "distributed", "plots", "findings", "lm.pretrained"],
    ["step", "cohort"],
    ["train", "cohort_train", "widgets", "noise", "integrations"],
    ["sweep", "protocol"],
    ["report_format", "report", "notebook_runner", "cli", "__main__", "__init__"],
]


def _layer(module: str):
    """Layer index of ``opdlab.<module>`` (a package's modules share its layer unless listed themselves)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        for i, layer in enumerate(LAYERS):
            if ".".join(parts[:n]) in layer:
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


def test_every_import_points_down_the_layers():
    upward = []
    for module, path in _modules():
        mine = _layer(module)
        assert mine is not None, f"opdlab.{module} is not placed in LAYERS: add it to the layer it belongs to"
        for target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_the_map_places_every_module_and_names_only_modules():
    modules = {module for module, _ in _modules()}
    unplaced = sorted(m for m in modules if _layer(m) is None)
    assert not unplaced, f"not in LAYERS: {unplaced}"
    named = {m for layer in LAYERS for m in layer}
    stale = sorted(m for m in named if m not in modules and not any(x.startswith(m + ".") for x in modules))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


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
    code = ("import sys; from opdlab.spec import RunSpec; from opdlab.presets import get; from opdlab.runtime import Runtime; "
            "s = RunSpec.from_dict(dict(divergence='gjsd:0.3', baseline='loo')); s.models.recipe('teacher'); "
            "get('notebook04').spec_for('tool_use'); Runtime(device='cpu'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""The house the imports draw: every opdlab import points down the layers of the README's map, and building a
TrainConfig loads no torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opdlab"

# The README's map, bottom to top; a module may import from its own layer or any layer below.
LAYERS = [
    ["choices", "tasks"],                                   # names and tasks: no torch
    ["divergences", "lm.recipe"],
    ["estimators", "lm.device", "lm.tokenizer"],
    ["toy", "symbolic", "lm.modeling", "lm.sampling", "lm.sft"],
    ["montecarlo", "audit", "audit_catalogue", "lm.cache", "config"],
    ["runlog", "distributed", "plots", "lm.pretrained"],
    ["train", "widgets", "integrations"],
    ["noise"],
    ["sweep"],
    ["notebook_runner", "cli", "__main__", "__init__"],
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
        if mine is None:  # a module the map does not place yet is not checked
            continue
        for target in _imports(path):
            theirs = _layer(target)
            if theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(upward)


def test_the_map_places_every_module_of_the_first_layers():
    for module in ("choices", "divergences", "estimators", "toy", "lm.cache", "lm.sampling", "config", "train"):
        assert _layer(module) is not None and (PACKAGE / (module.replace(".", "/") + ".py")).exists()


def test_a_config_is_built_without_torch():
    code = ("import sys; from opdlab.config import TrainConfig; "
            "c = TrainConfig(divergence='gjsd:0.3', baseline='loo'); c.recipe('teacher'); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match="TrainConfig.divergence"):
        from opdlab.config import TrainConfig
        TrainConfig(divergence="kl_typo")

"""The conda file stays in step with pyproject, and the README's two commands exist."""
import json
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_torch_is_pinned():
    assert "torch==2.13.0" in _pyproject()["project"]["dependencies"]


def test_environment_yml_installs_the_package_with_the_same_torch_pin():
    env = (ROOT / "environment.yml").read_text()
    pins = [d for d in _pyproject()["project"]["dependencies"] if "==" in d]
    for pin in pins:
        assert pin in env, f"environment.yml lacks {pin} from pyproject.toml"
    assert re.search(r"-\s+-e\s+\.(\[[\w,]+\])?", env), "environment.yml must install the package itself with pip"
    python = re.search(r"python=(\d+\.\d+)", env).group(1)
    minimum = re.search(r">=(\d+\.\d+)", _pyproject()["project"]["requires-python"]).group(1)
    assert tuple(map(int, python.split("."))) >= tuple(map(int, minimum.split(".")))


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make figures" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^figures:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_committed_notebooks_have_no_outputs_and_a_parameters_cell():
    import nbformat

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells), f"{path.name} has outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name} lacks parameters"
        # valid as written, cell ids included (nbformat fills missing ids in on reading, with a warning that
        # future versions make an error): so check the file's own JSON
        raw = json.loads(path.read_text())
        assert all("id" in c for c in raw["cells"]), f"{path.name} has cells without an id"
        nbformat.validate(nbformat.from_dict(raw))

"""The command line and the notebook runner's parameter checks (no kernel is started here)."""
import nbformat
import pytest

from opdlab import cli
from opdlab.notebook_runner import check_parameters, notebook_parameters, resolve_notebook


@pytest.fixture
def notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("seed = 0\nn_samples = 64\nlr = 0.1\nnames = ['jsd']\nquick = False\n"
                                       "figures_dir = '../figures'")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), params, nbformat.v4.new_code_cell("x = seed")]
    path = tmp_path / "07_demo.ipynb"
    nbformat.write(nb, path)
    return path


def test_parameters_are_read_from_the_tagged_cell(notebook):
    assert notebook_parameters(notebook) == dict(seed=0, n_samples=64, lr=0.1, names=["jsd"], quick=False,
                                                 figures_dir="../figures")


def test_good_overrides_pass(notebook):
    check_parameters(notebook, dict(seed=3, lr=1, names=("jsd", "tv"), quick=True, figures_dir="/tmp/x"))


@pytest.mark.parametrize("override,match", [
    (dict(sed=1), "has no parameter 'sed'; its parameters are: seed=0"),
    (dict(n_samples="many"), "'n_samples' of 07_demo.ipynb must be a int"),
    (dict(lr="fast"), "must be a float"),
    (dict(names=3), "must be a list"),
    (dict(quick=1), "must be a bool"),
])
def test_bad_overrides_are_rejected_before_running(notebook, override, match):
    with pytest.raises(ValueError, match=match):
        check_parameters(notebook, override)


def test_notebook_without_parameters_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(nb, tmp_path / "08_x.ipynb")
    with pytest.raises(ValueError, match="no cell tagged 'parameters'"):
        notebook_parameters(tmp_path / "08_x.ipynb")


def test_resolve_by_number_and_unknown(notebook):
    assert resolve_notebook("7", notebook.parent) == notebook
    assert resolve_notebook("07_demo", notebook.parent) == notebook
    with pytest.raises(ValueError, match="no notebook '99'; known: 07_demo"):
        resolve_notebook("99", notebook.parent)


def test_cli_reports_errors_without_a_traceback(capsys):
    assert cli.main(["notebooks", "99_nothing"]) == 2
    assert "error: no notebook '99_nothing'" in capsys.readouterr().err


def test_cli_lists_divergences(capsys):
    assert cli.main(["divergences"]) == 0
    out = capsys.readouterr().out
    assert "forward_kl" in out and "u ln u" in out and "alpha:0.5" in out


def test_cli_parameter_literals():
    assert cli._literal("3") == 3 and cli._literal("[1, 2]") == [1, 2] and cli._literal("jsd") == "jsd"

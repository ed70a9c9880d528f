"""The command line and the notebook runner's parameter checks (no kernel is started here)."""
import nbformat
import pandas as pd
import pytest

from opdlab.app import cli
from opdlab.app.notebooks import check_parameters, notebook_parameters, resolve_notebook


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


def test_an_auto_parameter_takes_a_count():
    """Notebook 04's ``workers = "auto"`` and ``cohort = "auto"`` take ``-p workers 2``; another type is refused."""
    path = resolve_notebook("04")
    assert check_parameters(path, dict(workers=2, cohort=4)) == dict(workers=2, cohort=4)
    with pytest.raises(ValueError, match="'cohort' of 04_real_students.ipynb must be a str"):
        check_parameters(path, dict(cohort=[2]))


def test_none_turns_an_optional_float_parameter_off(notebook):
    check_parameters(notebook, dict(lr=None))  # e.g. notebook 04's -p log_u_clip None


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


# -- opdlab toy ------------------------------------------------------------------------------------------------
def _table(out: str) -> dict:
    """The rows of a printed table that end in numbers, by their first word: {name: [floats]}."""
    rows = {}
    for line in out.splitlines():
        cells, numbers = line.split(), []
        while len(cells) > 1:
            try:
                numbers.insert(0, float(cells[-1]))
            except ValueError:
                break
            cells.pop()
        if numbers:
            rows[cells[0]] = numbers
    return rows


def test_cli_toy_prints_the_exact_cosines(capsys, tmp_path):
    from opdlab.experiments.montecarlo import estimator_cosines

    csv = tmp_path / "out" / "cosines.csv"
    assert cli.main(["toy", "-d", "reverse_kl", "forward_kl", "-d", "jsd", "--n-toys", "4", "--seed", "3",
                     "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert "mean over 4 random toys" in out and set(rows) == {"reverse_kl", "forward_kl", "jsd"}
    opd, plus = {k: v[0] for k, v in rows.items()}, {k: v[1] for k, v in rows.items()}
    assert opd["reverse_kl"] == pytest.approx(1.0, abs=1e-3)  # its stop-gradient error is a constant: no bias
    assert all(v == pytest.approx(1.0, abs=1e-3) for v in plus.values())  # OPD+ is the exact gradient
    assert opd["forward_kl"] < 0  # points the wrong way (docs/math.md §3: about -0.95), while OPD+ is exact
    assert opd["jsd"] < plus["jsd"] - 0.1
    saved = pd.read_csv(csv)
    direct = estimator_cosines(["reverse_kl", "forward_kl", "jsd"], n_toys=4, seed=3)
    pd.testing.assert_frame_equal(saved, direct, check_exact=False)
    assert rows["forward_kl"][0] == pytest.approx(direct.query("divergence == 'forward_kl' and method == 'opd'")
                                                  .cosine.mean(), abs=1e-3)


def test_cli_toy_unknown_divergence(capsys):
    assert cli.main(["toy", "-d", "forward_kl", "nope", "--n-toys", "1"]) == 2
    err = capsys.readouterr().err
    assert "opdlab toy: error: unknown divergence 'nope'; allowed: reverse_kl" in err


@pytest.mark.parametrize("argv,match", [(["--n-toys", "0"], "--n-toys: must be a positive integer"),
                                        (["--seed", "x"], "--seed: invalid int value")])
def test_cli_toy_bad_numbers(capsys, argv, match):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["toy", *argv])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


# -- opdlab eval -----------------------------------------------------------------------------------------------
def _save_tiny(path, alphabet):
    from opdlab.config.recipe import ModelRecipe
    from opdlab.lm.modeling import build_model, save_model
    from opdlab.lm.tokenizer import char_tokenizer

    tok = char_tokenizer(alphabet)
    return save_model(build_model(ModelRecipe(hidden=16, layers=1, heads=1, intermediate=32), tok), tok, path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from opdlab.tasks import get_task

    root = tmp_path_factory.mktemp("checkpoints")
    return {name: _save_tiny(root / name, get_task(name).alphabet if name != "ab" else "ab\n")
            for name in ("arithmetic", "tool_use", "ab")}


def test_cli_eval_prints_accuracies_and_writes_scores(capsys, tmp_path, checkpoints):
    from opdlab.tasks import get_task, summarize

    csv = tmp_path / "scores.csv"
    argv = ["eval", str(checkpoints["arithmetic"]), "--task", "arithmetic", "-n", "3", "--samples", "2",
            "--seed", "5", "--max-new-tokens", "6", "--device", "cpu", "--csv", str(csv)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "arithmetic: 3 held-out examples (test split, seed 5), at most 6 new tokens, cpu" in out
    assert "call accuracy" not in out  # arithmetic has no calls
    rows = pd.read_csv(csv)
    assert list(rows.columns[:3]) == ["decoding", "example", "sample"] and len(rows) == 3 * (1 + 2)
    assert list(rows[rows.decoding == "greedy"].prompt) == [ex.prompt for ex in get_task("arithmetic")
                                                            .examples("test", 3, seed=5)]
    table = _table(out)
    for label, decoding in (("greedy", "greedy"), ("avg@2", "sampled")):
        s = summarize(rows[rows.decoding == decoding])
        assert table[label][-2:] == pytest.approx([s["accuracy"], s["malformed_rate"]], abs=1e-3)
    assert table["greedy"] == [0.0, 1.0]  # an untrained model writes no final answer in 6 tokens


def test_cli_eval_reports_call_accuracy_for_tool_tasks(capsys, checkpoints):
    argv = ["eval", str(checkpoints["tool_use"]), "--task", "tool_use", "-n", "2", "--samples", "1",
            "--max-new-tokens", "4", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "call accuracy" in out and _table(out)["greedy"] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("model,task,match", [
    ("missing", "arithmetic", "no such directory"),
    ("ab", "arithmetic", "cannot encode 17 of the 18 characters of task 'arithmetic'"),
    ("arithmetic", "nope", "unknown task 'nope'"),
])
def test_cli_eval_bad_inputs(capsys, checkpoints, tmp_path, model, task, match):
    path = checkpoints.get(model, tmp_path / model)
    assert cli.main(["eval", str(path), "--task", task, "-n", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opdlab eval: error: ") and match in err and "Traceback" not in err


def test_cli_eval_reads_a_run_directory(capsys, checkpoints, tmp_path):
    import shutil

    shutil.copytree(checkpoints["arithmetic"], tmp_path / "run" / "checkpoint")
    (tmp_path / "run" / "config.json").write_text("{}")  # a TrainConfig, not a model config
    argv = ["eval", str(tmp_path / "run"), "--task", "arithmetic", "-n", "1", "--samples", "1",
            "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert str(tmp_path / "run" / "checkpoint") in capsys.readouterr().out

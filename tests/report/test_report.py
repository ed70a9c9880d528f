"""``opdlab report``: the committed documents agree with the committed data, and the check fails when one number
differs (in a document, or in the data behind it)."""
import shutil
from pathlib import Path

import pandas as pd
import pytest

from opdlab.app.cli import main
from opdlab.errors import UserError
from opdlab.report import render as report

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_documents_are_what_the_data_gives():
    assert report.check(ROOT) == [], "run `opdlab report` and commit what it writes"


@pytest.fixture
def tree(tmp_path):
    """A copy of what the report reads and writes: README.md, docs/, figures/data/ and benchmarks/results/."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "figures" / "data", tmp_path / "figures" / "data")
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results",
                    ignore=shutil.ignore_patterns("*.png", "*.json"))
    assert report.check(tmp_path) == []
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_an_edited_number_in_the_readme_table_fails_the_check_by_region(tree):
    accuracy = report.arms(tree)["accuracy"].iloc[0]  # e.g. '0.672', as the README prints it
    _edit(tree / "README.md", f"| {accuracy} ", "| 0.999 ")
    problems = report.check(tree)
    assert len(problems) == 1 and problems[0].startswith("README.md region headline differs"), problems
    assert "0.999" in problems[0]  # the first changed line is quoted


def test_an_edited_number_in_results_fails_the_check(tree):
    _edit(tree / "docs" / "results.md", "| γ = 1 / γ = 0 ", "| γ = 2 / γ = 0 ")
    problems = report.check(tree)
    assert len(problems) == 1 and problems[0].startswith("docs/results.md differs"), problems


def test_changed_data_fails_the_check_for_every_document_it_feeds(tree):
    path = tree / "figures" / "data" / "04_arms.csv"
    final = pd.read_csv(path)
    final.loc[0, "accuracy"] += 0.01
    final.to_csv(path, index=False)
    problems = report.check(tree)
    assert [p.split(" differs")[0] for p in problems] == ["docs/results.md", "README.md region headline"], problems


def test_a_committed_benchmark_csv_is_rendered_into_its_region(tree):
    results = tree / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"phase": ["sample", "teacher"], "median_s": [0.0641234, 0.019]}).to_csv(
        results / "bench_train-cpu.csv", index=False)
    problems = report.check(tree)
    assert len(problems) == 1 and problems[0].startswith("docs/performance.md region bench_train"), problems
    assert report.write(tree) == ["docs/performance.md"]
    text = (tree / "docs" / "performance.md").read_text()
    assert "| sample  | 0.06412    |" in text and "bench_train-cpu.csv" in text
    assert report.check(tree) == []


def test_the_cli_check_exits_1_naming_the_region_and_report_repairs_it(tree, capsys):
    assert main(["report", "--check", "--root", str(tree)]) == 0
    _edit(tree / "README.md", "| supervised KD ", "| supervised KD!")
    assert main(["report", "--check", "--root", str(tree)]) == 1
    assert "README.md region headline differs" in capsys.readouterr().err
    assert main(["report", "--root", str(tree)]) == 0
    assert "wrote README.md" in capsys.readouterr().out
    assert main(["report", "--check", "--root", str(tree)]) == 0


def test_bad_markers_and_missing_data_are_refused_by_name(tree, capsys):
    readme = tree / "README.md"
    readme.write_text(readme.read_text() + "\n<!-- report:headlines -->\n<!-- /report:headlines -->\n")
    with pytest.raises(UserError, match="'headlines'.*known: headline"):
        report.check(tree)
    readme.write_text("<!-- report:headline -->\nno end\n")
    with pytest.raises(UserError, match="'headline' is never closed"):
        report.render(tree)
    (tree / "figures" / "data" / "04_arms.csv").unlink()
    assert main(["report", "--check", "--root", str(tree)]) == 2
    assert "04_arms.csv is missing" in capsys.readouterr().err

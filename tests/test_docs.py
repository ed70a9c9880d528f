"""The README stays an overview that holds the two commands and a working example, every relative link in the
README and docs/ resolves, and docs/architecture.md's map names every module of the package."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 150


def _outside_code(text: str) -> str:
    """``text`` without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))


def _slug(heading: str) -> str:
    """The anchor a markdown heading gets (GitHub's rule: lower case, punctuation dropped, spaces to hyphens)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(path: Path) -> list[str]:
    """The relative links and images of a markdown file whose file, or heading anchor, does not exist."""
    broken = []
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", _outside_code(path.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{path.name}: {target} (no such file)")
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", _outside_code(linked.read_text()), re.M)
            if anchor not in {_slug(h) for h in headings}:
                broken.append(f"{path.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_resolves():
    assert [b for path in DOCS for b in broken_links(path)] == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## A section\n\n[ok](a.md#a-section) [file](b.md) "
                                   "[anchor](a.md#no-section) `[code](c.md)` [web](https://example.org/x)\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: b.md (no such file)", "a.md: a.md#no-section (no such heading)"]


def test_the_readme_is_short_and_holds_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= MAX_README_LINES
    bash = "\n".join(re.findall(r"^```bash\n(.*?)^```", readme, re.M | re.S))
    assert re.search(r"^make figures\b", bash, re.M) and re.search(r"^make test\b", bash, re.M)
    makefile = (ROOT / "Makefile").read_text()
    # both set the machine up first: figures then runs the notebooks, test the test suite
    assert re.search(r"^figures: setup\n\t.*opdlab notebooks", makefile, re.M)
    assert re.search(r"^test: setup\b.*\n\t.*pytest", makefile, re.M)


def test_the_readme_example_runs():
    code = re.search(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "opd_plus: cosine to the true gradient +1.00" in done.stdout


def _mapped_paths(block: str) -> set[str]:
    """The module paths a tree drawn by indentation names: ``  core/`` then ``    divergences.py`` gives
    ``core/divergences.py``."""
    stack, paths = [], set()
    for line in block.splitlines()[1:]:
        stripped = line.lstrip()
        name = stripped.split()[0] if stripped else ""
        depth = (len(line) - len(stripped)) // 2
        if not name or depth == 0:
            continue
        stack = stack[:depth - 1]
        if name.endswith("/"):
            stack.append(name)
        elif name.endswith(".py"):
            paths.add("".join(stack) + name)
    return paths


def test_the_architecture_map_names_every_module_and_nothing_gone():
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"^```\n(opdlab/.*?)^```", text, re.M | re.S).group(1)
    named = _mapped_paths(block)
    package = ROOT / "opdlab"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")} - {"__init__.py", "__main__.py"}
    modules = {m for m in modules if not m.endswith("/__init__.py")}
    assert sorted(modules - named) == [], f"docs/architecture.md's map lacks {sorted(modules - named)}"
    assert sorted(named - modules) == [], f"docs/architecture.md's map names what does not exist: {sorted(named - modules)}"


def test_the_map_reader_sees_a_module_in_a_folder():
    assert _mapped_paths("opdlab/\n  core/   x\n    a.py  y\n  b.py\n  app/\n    plots/\n      c.py\n") == {
        "core/a.py", "b.py", "app/plots/c.py"}



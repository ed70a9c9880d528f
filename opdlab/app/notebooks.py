"""Execute the numbered notebooks headlessly with papermill, with parameters checked before anything runs.

A notebook's parameters are the flat literals of its cell tagged ``parameters``. ``execute_notebook`` checks
every override against them first: an unknown name (the message lists the notebook's parameters) or a value of
the wrong type (an int where the default is a list, ...) is rejected before a kernel starts. Notebooks that train
declare ``preset``, ``overrides`` and ``runtime``: any ``RunSpec`` or ``Runtime`` field is then accepted by its
own name and checked by building the spec and runtime (``check_parameters``).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from opdlab.errors import UserError

__all__ = ["NOTEBOOKS_DIR", "list_notebooks", "resolve_notebook", "notebook_parameters", "check_parameters",
           "execute_notebook", "failure_message"]

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
EXECUTED_DIR = NOTEBOOKS_DIR / "_executed"


def list_notebooks(directory: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered notebooks ``NN_topic.ipynb`` in ``directory``, in order."""
    return sorted(p for p in Path(directory).glob("[0-9][0-9]_*.ipynb"))


def resolve_notebook(name: str | os.PathLike, directory: Path = NOTEBOOKS_DIR) -> Path:
    """A notebook by path, by file name, or by its number (``"2"``, ``"02"``, ``"02_categorical_toys"``)."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.exists():
        return path
    known = list_notebooks(directory)
    key = str(name).removesuffix(".ipynb")
    if key.isdigit():
        key = f"{int(key):02d}"
    matches = [p for p in known if p.stem == key or p.stem.split("_", 1)[0] == key]
    if len(matches) != 1:
        raise UserError(f"no notebook {str(name)!r}; known: {', '.join(p.stem for p in known) or '(none)'}")
    return matches[0]


def notebook_parameters(path: Path) -> dict[str, object]:
    """Name -> default value of the notebook's ``parameters`` cell (a UserError if it has none)."""
    import ast

    import nbformat

    nb = nbformat.read(path, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise UserError(f"{path.name} has no cell tagged 'parameters'; papermill cannot rerun it with new values")
    params: dict[str, object] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            params[node.targets[0].id] = ast.literal_eval(node.value)
    return params


def _same_kind(default, value) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if default is None or value is None:  # an optional parameter: None turns it off, a value turns it on
        return True
    if default == "auto":  # "auto" or a count (workers, cohort)
        return isinstance(value, (str, int))
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(path: Path, parameters: dict[str, object]) -> dict[str, object]:
    """The overrides as the notebook takes them, checked before a kernel starts; a ``UserError`` otherwise.

    A name the notebook declares must keep its default's type. A notebook that declares ``overrides`` (a dict of
    ``RunSpec`` fields over its ``preset``) and ``runtime`` (a dict of ``Runtime`` fields) also takes any spec or
    runtime field by its own name: ``-p lr 3e-4`` lands in ``overrides``, ``-p device cuda`` in ``runtime``. The
    spec and runtime they make are built here, so a bad value is refused before any model trains.
    """
    from opdlab.config.runtime import Runtime
    from opdlab.config.spec import RunSpec

    declared = notebook_parameters(path)
    routed = {k: dict(declared[k]) for k in ("overrides", "runtime") if isinstance(declared.get(k), dict)}
    out = {}
    for key, value in parameters.items():
        if key in declared:
            if not _same_kind(declared[key], value):
                raise UserError(f"parameter {key!r} of {path.name} must be a {type(declared[key]).__name__} "
                                f"like its default {declared[key]!r}, got {value!r}")
            out[key] = value
        elif "overrides" in routed and key in RunSpec.field_names():
            routed["overrides"][key] = value
        elif "runtime" in routed and key in Runtime.field_names():
            routed["runtime"][key] = value
        else:
            fields = (" or any RunSpec field (docs/usage.md)" if "overrides" in routed else "")
            raise UserError(f"{path.name} has no parameter {key!r}; its parameters are: "
                            + ", ".join(f"{k}={v!r}" for k, v in declared.items()) + fields)
    for key in routed:
        if key in out:
            routed[key] = {**routed[key], **out[key]}
        if routed[key] != declared[key]:
            out[key] = routed[key]
    if "preset" in declared or "overrides" in declared or "runtime" in declared:
        from opdlab.config.presets import get

        preset = get(out.get("preset", declared.get("preset"))) if ("preset" in declared) else None
        base = preset.spec if preset is not None else RunSpec()
        base.replace(**out.get("overrides", declared.get("overrides") or {}))
        Runtime(**out.get("runtime", declared.get("runtime") or {}))
    return out


class _LinesAboveBar:
    """A file-like stdout for papermill: the kernel's printed lines go above the cell progress bar
    (``tqdm.write``) instead of being glued onto it."""

    def write(self, text: str) -> None:
        from tqdm import tqdm

        for line in text.splitlines():
            tqdm.write(line, file=sys.stdout)

    def flush(self) -> None:
        sys.stdout.flush()


def failure_message(path: Path, err, out: Path) -> str:
    """One line for a notebook that raised: where, the exception's type and message (a value the notebook's
    own code refused, such as a RunSpec field), and where the executed copy keeps the full traceback."""
    evalue = (str(err.evalue).splitlines() or [""])[0]
    return (f"{path.name} raised {err.ename}: {evalue} (in cell [{err.exec_count}] of the executed copy {out}, "
            "with the full traceback)")


def execute_notebook(name: str | os.PathLike, parameters: dict | None = None,
                     output_dir: str | os.PathLike | None = None, progress: bool = True,
                     kernel_name: str | None = None) -> Path:
    """Run one notebook with papermill (cwd = its folder); return the path of the executed copy.

    The executed copy goes to ``output_dir`` (default ``notebooks/_executed/``, ignored by git), so the
    committed notebooks stay without outputs. Figures go wherever the notebook's ``figures_dir`` says. A cell
    that raises becomes a UserError of one line (``failure_message``).
    """
    import papermill as pm

    path = resolve_notebook(name)
    parameters = check_parameters(path, dict(parameters or {}))
    out_dir = Path(output_dir) if output_dir is not None else EXECUTED_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent),
                            progress_bar=progress, kernel_name=kernel_name,
                            stdout_file=_LinesAboveBar() if progress else None)  # e.g. the sweep's line per run
    except pm.PapermillExecutionError as err:
        raise UserError(failure_message(path, err, out)) from None
    if progress:
        print(f"{path.name}: {time.perf_counter() - start:.1f} s -> {out}")
    return out

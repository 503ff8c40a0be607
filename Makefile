# Two commands for a new user: `make demo` and `make test`. Both create the virtual environment
# and install the package with the pinned development constraints on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test speed install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/saliencylab demo --out demo-out

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

speed: $(VENV)/.installed-test
	$(BIN)/python benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(VENV) demo-out

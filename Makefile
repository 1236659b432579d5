# Two commands do all set-up on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build on its own.
# CUDA users: make TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast quickstart clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,hf]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --timeout=900

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

quickstart: $(STAMP)
	$(PY) -m nanolit quickstart

clean:
	rm -rf $(VENV) runs .pytest_cache

# Set-up and the two commands of the README.  Everything runs on the CPU by default.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

demo: $(VENV)/.installed
	$(VENV)/bin/detr-jax demo --workdir demo

bench: $(VENV)/.installed
	$(PY) bench/bench_forward.py

clean:
	rm -rf $(VENV) .pytest_cache

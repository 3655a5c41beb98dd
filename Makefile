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

# The tests also cover the TensorFlow Datasets adapter: its extra is installed for them only.
$(VENV)/.installed-tfds: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,tfds]"
	touch $@

install: $(VENV)/.installed

# Two pytest workers (pytest-xdist), a test module each at a time, the longest first (see
# tests/conftest.py): the suite is mostly XLA compilation, which runs on one core.
test: $(VENV)/.installed-tfds
	$(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

demo: $(VENV)/.installed
	$(VENV)/bin/detr-jax demo --workdir demo

bench: $(VENV)/.installed
	$(PY) bench/bench_forward.py

clean:
	rm -rf $(VENV) .pytest_cache

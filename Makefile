# torch is pinned first: a bare `pip install torch` pulls a multi-GB CUDA build; 2.13.0 CPU lies on our machines.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC := torch==2.13.0

.PHONY: test test-all demo lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 -m "not slow" --durations=15

# the whole suite, with the slow multi-process variants (about 1 minute more)
test-all: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --durations=15

demo: $(VENV)/.installed
	$(PY) examples/digits_mlp.py

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(VENV)/.installed
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) lightning_logs runs

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench venv

# The venv is (re)built whenever the project's dependencies change.
$(VENV)/.omnilm-installed: pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh

venv: $(VENV)/.omnilm-installed

## Main job on the embedded default.
demo: venv
	$(VENV)/bin/omnilm run

## The test suite (slow tests included only with SLOW=1).
test: venv
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q $(if $(SLOW),,-m "not slow")

## Lint only: the code is laid out by hand (compact, 120 columns), not by a formatter.
lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

bench: venv
	$(PY) benchmarks/decode.py

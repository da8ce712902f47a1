# Quick start: `make demo`, `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: venv demo test lint bench chaos clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# Keep a torch the user already has in the venv; otherwise the pinned CPU build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test,cli,serve]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m aioti demo

test: venv
	$(PY) -m ruff check aioti tests benchmarks examples docs chaos
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check aioti tests benchmarks examples docs chaos
	$(PY) -m mypy aioti --ignore-missing-imports

bench: venv
	$(PY) benchmarks/throughput.py --json out/throughput.json

# Not part of `make test`: about seven minutes on two cores (chaos/run.py).
chaos: venv
	$(PY) chaos/run.py

clean:
	rm -rf $(VENV) build *.egg-info

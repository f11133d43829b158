# Tether developer commands. `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
IMPORT_TREE := $(VENV)/import-tree

.PHONY: run test lint typecheck check bench chaos install clean js js-check

$(STAMP): pyproject.toml
	@if [ -d $(VENV) ]; then echo "installing tether into the existing $(VENV)…"; \
	else echo "creating $(VENV) and installing tether (first run takes about a minute)…"; fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)
	@echo "installed tether in $(VENV)"

install: $(STAMP)

## Run the server with the embedded Redis and the demo application on 127.0.0.1:8000.
run: $(STAMP)
	$(BIN)/tether serve

## Run the whole test suite (starts its own redis-server processes on free ports).
test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadgroup

.PHONY: browser test-browser test-oldest

## Chromium for the browser tests, from Debian's package, when /usr/bin/chromium is missing.
browser:
	bash .ci/install-browser

## Only the browser tests (real Chromium driven by Playwright; the 100-lifetime run takes ~4 min).
test-browser: $(STAMP) browser
	$(BIN)/pytest -q -p no:cacheprovider tests/test_browser.py

## The code against the lowest version of each runtime dependency pyproject.toml admits
## (.ci/oldest.txt), in a venv of its own: the tests that reach into uvicorn, websockets,
## redis-py, starlette, PyJWT and prometheus-client (about 4 minutes). CI runs it.
OLDEST := .venv-oldest
OLDEST_TESTS := tests/test_compat.py tests/test_http_limits.py tests/test_sync.py \
	tests/test_sync_fuzz.py tests/test_client.py tests/test_client_core.py \
	tests/test_client_faults.py tests/test_redis_conn.py tests/test_tokens.py \
	tests/test_auth_http.py tests/test_metrics.py
test-oldest:
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -c .ci/oldest.txt -e '.[dev]'
	$(OLDEST)/bin/pytest -q -p no:cacheprovider -n 2 --dist loadgroup $(OLDEST_TESTS)

## Lint, format check, and the import contracts of pyproject.toml ([tool.importlinter]).
lint: $(STAMP) $(IMPORT_TREE)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PYTHONPATH=$(IMPORT_TREE) $(BIN)/lint-imports --no-cache

# import-linter reads a package from the one directory it is found in, and `tether` comes from
# two source roots (server/tether, client/tether/client): it reads this tree of links, which
# joins them as the wheel does. Links, so it is always the current source; rebuilt each time.
.PHONY: $(IMPORT_TREE)
$(IMPORT_TREE):
	rm -rf $(IMPORT_TREE)
	mkdir -p $(IMPORT_TREE)/tether
	ln -s $(CURDIR)/server/tether/* $(IMPORT_TREE)/tether/
	ln -s $(CURDIR)/client/tether/client $(IMPORT_TREE)/tether/client

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

## Benchmarks: each prints Tether's figures beside a baseline measured in the same run. This is
## the quick pass over every script of bench/ but chaos.py (`make chaos`), with small arguments
## (about 4 minutes); the figures in docs/benchmarks.md come from each script's defaults.
bench: $(STAMP)
	$(BIN)/python bench/jwt_algorithms.py --batches 5 --batch-ms 100
	$(BIN)/python bench/auth.py --duration 1 --rounds 2 --round-seconds 0.5 --signins 10
	$(BIN)/python bench/sync_memory.py --n 1000 --servers bare,tether --idle 2
	$(BIN)/python bench/sync_connect.py --n 500 --repeat 1 --servers bare,tether
	$(BIN)/python bench/sync_expiry.py --n 500 --spread 5
	$(BIN)/python bench/sync_revocation.py --repeat 20 --background 100
	$(BIN)/python bench/fanout.py --n 500 --rounds 5 --warmup 1
	$(BIN)/python bench/mutations.py --clients 1,16 --seconds 2
	$(BIN)/python bench/reconnect.py --k 1,10 --repeat 10
	$(BIN)/python bench/partitions.py --clients 16 --partitions 16 --seconds 1
	$(BIN)/python bench/reconnect_storm.py --n 500 --procs 2 --timeout 300
	$(BIN)/python bench/scale_sockets.py --instances 2 --n 1000 --expiry 200 --spread 3 --rounds 10 --idle 2

## The long chaos run (docs/reliability.md): 20 client processes, 500 access-token lifetimes
## (~17 min) on a standalone Redis, then 150 (~5 min) on a Redis Cluster whose master fails over.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py --clients 20 --lifetimes 500
	$(BIN)/python bench/chaos.py --redis cluster --clients 20 --lifetimes 150

## The browser client (js/): build it, and the copy the server serves (server/tether/server/static).
js/node_modules/.package-lock.json: js/package-lock.json
	cd js && npm ci --no-audit --no-fund

js: js/node_modules/.package-lock.json
	cd js && npm run build

## CI: the browser client's type check, unit and integration tests (a real `tether serve`), and
## that the committed served copy is this build.
js-check: $(STAMP) js/node_modules/.package-lock.json
	cd js && npm run typecheck && npm test && npm run build
	git diff --exit-code -- server/tether/server/static/tether.js || \
		{ echo "server/tether/server/static/tether.js is not the build of js/: run make js and commit it"; exit 1; }

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .mypy_cache .ruff_cache

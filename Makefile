# Two commands matter on a fresh Debian/Ubuntu machine: `make run` and `make test`.
# Everything they need (Debian packages, the .venv) is installed here, on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# `make run` needs the runtime dependencies only (no pytest, linters or test data).
RUN_STAMP := $(VENV)/.installed-run
PYTEST_ARGS ?=

.PHONY: run test test-fast lint bench clean os-run os-test

run: os-run $(RUN_STAMP)
	$(BIN)/pacs-embed run

test: os-test $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Everything but the end-to-end tests (a Redis server is still needed: `make test` installs it).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not e2e" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy pipeline dicom_listener workers pacs_embed

bench: os-test $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.convert
	$(BIN)/python -m bench.endpoint
	$(BIN)/python -m bench.verdicts
	$(BIN)/python -m bench.push latency
	$(BIN)/python -m bench.push spool
	$(BIN)/python -m bench.push sr
	$(BIN)/python -m bench.e2e
	$(BIN)/python -m bench.chaos all

os-run:
	@scripts/install-os-packages run

os-test:
	@scripts/install-os-packages test

$(RUN_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache

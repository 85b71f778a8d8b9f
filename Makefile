# mailgate: `make run` starts the daemon, `make test` runs lint, types, the import layers and
# the whole suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench bench-memory clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/mailgate --config config.toml serve

lint: $(STAMP)
	$(BIN)/ruff check mailgate tests bench
	$(BIN)/ruff format --check mailgate tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# Three workers, each test file whole on one (module-scoped daemons are started once): most
# tests wait on a daemon or a timeout, so three keep a 2-core machine busy. The slowest
# tests are listed at the end, to see where the suite's time goes.
test: lint
	$(BIN)/pytest -n 3 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python bench/intake.py
	$(BIN)/python bench/intake.py --tls
	$(BIN)/python bench/auth.py

bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache .import_linter_cache

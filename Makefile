# chunkd: two commands for a newcomer on a fresh Debian machine with Python 3.11.
#   make run    set up and start the server on its defaults (127.0.0.1:8080, ./data)
#   make test   set up and run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint setup libmagic browser strace tusclients bench mutate clean

run: setup
	$(BIN)/chunkd serve

test: setup browser strace tusclients lint
	$(BIN)/pytest

# ruff (style, imports, bugbear) and mypy (strict for the store, the model and the errors).
lint: setup
	$(BIN)/ruff check chunkd tests benchmarks scripts
	$(BIN)/mypy

# Remove one guarantee at a time (scripts/mutants.toml) and show that the suite goes red.
mutate: setup browser strace tusclients
	$(BIN)/python scripts/mutate.py --markdown docs/MUTATION.md

setup: $(VENV)/.installed libmagic

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# python-magic needs the C library libmagic (Debian: libmagic1).
libmagic:
	@$(BIN)/python -c 'import magic' 2>/dev/null || ./scripts/install-libmagic.sh
	@$(BIN)/python -c 'import magic'

# Side-by-side measurements (raw disk, chunkd, tus peers) -> docs/BENCHMARKS.md + docs/benchmarks.png.
# Installs the peers (tuspyserver, @tus/server) under benchmarks/.peers/ on first use.
bench: setup
	$(BIN)/python benchmarks/run.py

# The browser test needs Debian's chromium (installed when run as root).
browser:
	@./scripts/install-tool.sh chromium chromium "the browser test"

# The real tus clients (tus-js-client, Uppy, and esbuild to bundle them for the browser), from
# npm into tests/tus_clients/node_modules, at the versions its package-lock.json pins.
TUS_CLIENTS := tests/tus_clients
tusclients: $(TUS_CLIENTS)/node_modules/.installed

$(TUS_CLIENTS)/node_modules/.installed: $(TUS_CLIENTS)/package.json $(TUS_CLIENTS)/package-lock.json
	@./scripts/install-tool.sh node nodejs "the tus client tests"
	@./scripts/install-tool.sh npm npm "the tus client tests"
	cd $(TUS_CLIENTS) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The durability test records syscalls with strace (installed when run as root).
strace:
	@./scripts/install-tool.sh strace strace "the durability test"

clean:
	rm -rf $(VENV) .pytest_cache

